"""Stock vLLM and vtw side by side, in one run, on a LLaVA-shaped random model (CPU):

(a) the most requests running at once at equal KV-cache bytes (text_only against stock), against
    the ideal ratio from the per-request slots (block granularity included);
(b) a prefill-heavy workload (N image requests at once, M new tokens each): requests/s, output
    tokens/s, mean time to first token, for stock, "shared" and "text_only".

    python -m vtw.vllm.bench --layers 8 --hidden 512 --image-size 144 --requests 64 --new 16

Engines run in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), one after the other.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def _cdiv(a, b):
    return -(-a // b)


def _engine(folder, layer, kv, blocks, bs, max_len, batched, seqs):
    from vllm import LLM

    over = {} if layer is None else {"vtw_layer": layer, "vtw_kv": kv}
    return LLM(str(folder), dtype="float32", distributed_executor_backend="uni", max_model_len=max_len,
               max_num_batched_tokens=batched, max_num_seqs=seqs, seed=0, block_size=bs,
               num_gpu_blocks_override=blocks, enable_prefix_caching=False, enforce_eager=True,
               hf_overrides=over or None, limit_mm_per_prompt={"image": 1})


def _workload(llm, n, new, prompt, image):
    from vllm import SamplingParams

    engine = llm.llm_engine
    sched = engine.engine_core.engine_core.scheduler
    sp = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    t0 = time.perf_counter()
    for i in range(n):
        engine.add_request(f"b{i}", {"prompt": prompt, "multi_modal_data": {"image": image}}, sp)
    first, most, out_tokens = {}, 0, 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        most = max(most, len(sched.running))
        now = time.perf_counter()
        for o in outs:
            if o.request_id not in first and o.outputs[0].token_ids:
                first[o.request_id] = now - t0
            if o.finished:
                out_tokens += len(o.outputs[0].token_ids)
    wall = time.perf_counter() - t0
    return dict(wall_s=wall, requests_per_s=n / wall, output_tokens_per_s=out_tokens / wall,
                mean_ttft_s=sum(first.values()) / max(len(first), 1), most_running=most)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=144, help="pixels (6 px patches: 144 -> 576 image tokens)")
    ap.add_argument("--layer", type=int, default=None, help="K (default L/2)")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--kv-requests", type=int, default=4, help="(a): KV bytes = this many stock requests")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")

    from vtw.vllm import tiny

    L = args.layers
    K = L // 2 if args.layer is None else args.layer
    g = min(K, L - K)
    if L % g or K % g:
        raise SystemExit("choose K so that min(K, L-K) divides K and L (vLLM groups layers in equal counts)")
    folder = tempfile.mkdtemp(prefix="vtw-vllm-bench-")
    tiny.build_llava(folder, layers=L, hidden=args.hidden, heads=args.heads, intermediate=args.hidden * 2,
                     image_size=args.image_size, patch=6)
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(folder)
    prompt = "<image> " + " ".join(["describe the shapes and colors"] * 6)
    image = tiny.image(0).resize((args.image_size, args.image_size))
    ids = proc(text=prompt, images=image, return_tensors="pt")["input_ids"][0]
    n_tok = int(ids.numel())
    n_text = int((ids != 4).sum())
    T, Tt, bs = n_tok + args.new, n_text + args.new, args.block_size
    max_len = _cdiv(T + 8, bs) * bs
    # bytes in units of (one layer's page): stock blocks hold L layers, text_only groups g layers
    stock_units = _cdiv(T, bs) * L
    vtw_units = _cdiv(T, bs) * K + _cdiv(Tt, bs) * (L - K)
    ideal = stock_units / vtw_units
    budget_units = args.kv_requests * stock_units
    res = dict(date=time.strftime("%Y-%m-%d"), layers=L, K=K, hidden=args.hidden, tokens=n_tok, text_tokens=n_text,
               new=args.new, block_size=bs, ideal_concurrency_ratio=ideal)
    # (a) most requests running at once at equal KV bytes
    n_a = args.kv_requests * 4
    conc = {}
    for name, layer, kv, blocks in [("stock", None, None, budget_units // L + 1),
                                    ("text_only", K, "text_only", budget_units // g + 1)]:
        llm = _engine(folder, layer, kv, blocks, bs, max_len, 8192, 256)
        conc[name] = _workload(llm, n_a, args.new, prompt, image)["most_running"]
        del llm
    res["most_running"] = conc
    res["concurrency_ratio"] = conc["text_only"] / conc["stock"]
    res["of_ideal"] = res["concurrency_ratio"] / ideal
    # (b) throughput of a prefill-heavy workload
    if not args.skip_throughput:
        thr = {}
        for name, layer, kv in [("stock", None, None), ("shared", K, "shared"), ("text_only", K, "text_only")]:
            llm = _engine(folder, layer, kv, None, bs, max_len, 2048, 64)
            _workload(llm, 2, 2, prompt, image)  # warm-up
            thr[name] = _workload(llm, args.requests, args.new, prompt, image)
            del llm
        res["throughput"] = thr
        flops_ideal = L / (K + (L - K) * n_text / n_tok)  # layer FLOPs, attention's quadratic term aside
        res["ideal_prefill_speedup"] = flops_ideal
        for name in ("shared", "text_only"):
            sp = thr[name]["requests_per_s"] / thr["stock"]["requests_per_s"]
            res[f"speedup_{name}"] = sp
            res[f"speedup_{name}_of_ideal"] = sp / flops_ideal
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
