"""Stock vLLM and vtw side by side, in one run, on a LLaVA-shaped random model (CPU):

(a) the most requests running at once at equal KV-cache bytes (text_only against stock), against
    the ideal ratio from the per-request slots (block granularity included);
(b) a prefill-heavy workload (N image requests at once, M new tokens each): requests/s, output
    tokens/s, mean time to first token, for stock, "shared" and "text_only".

    python -m vtw bench --engine vllm --preset small [--tensor-parallel 2]
    python -m vtw.vllm.bench --layers 8 --hidden 512 --intermediate 1376 --image-size 144 --requests 64 --new 16

(the first runs the second with the preset's decoder shape; results in bench/RESULTS.md).

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


TP = 1  # --tp


def _engine(folder, layer, kv, blocks, bs, max_len, batched, seqs):
    from vllm import LLM

    over = {} if layer is None else {"vtw_layer": layer, "vtw_kv": kv}
    tp = dict(tensor_parallel_size=TP, distributed_executor_backend="mp") if TP > 1 else \
        dict(distributed_executor_backend="uni")
    return LLM(str(folder), dtype="float32", **tp, max_model_len=max_len,
               max_num_batched_tokens=batched, max_num_seqs=seqs, seed=0, block_size=bs,
               num_gpu_blocks_override=blocks, enable_prefix_caching=False, enforce_eager=True,
               hf_overrides=over or None, limit_mm_per_prompt={"image": 1})


def _close(llm):
    """Shuts the engine down (TP workers included) before the next one starts."""
    import gc

    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001  (already down)
        pass
    del llm
    gc.collect()


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


def table(res) -> str:
    """The results as a plain-text table."""
    lines = [f"vLLM (CPU), LLaVA-shaped random model: {res['layers']} layers, hidden {res['hidden']}, K = {res['K']}, "
             f"{res['tokens']} prompt tokens ({res['text_tokens']} text), {res['new']} new tokens, "
             f"block size {res['block_size']}, tensor parallel {res.get('tp', 1)}"]
    mr = res["most_running"]
    lines.append(f"(a) most requests running at once, equal KV bytes: stock {mr['stock']}, text_only {mr['text_only']}: "
                 f"{res['concurrency_ratio']:.2f}x, ideal {res['ideal_concurrency_ratio']:.2f}x from the slots of prompt + new "
                 f"tokens ({res['ideal_concurrency_ratio_at_admission']:.2f}x from the prompt's) "
                 f"({res['of_ideal']:.2f} of ideal; target 0.9: {'met' if res['of_ideal'] >= 0.9 else 'not met'})")
    if "throughput" in res:
        lines.append(f"(b) {'engine':<10} {'requests/s':>10} {'out tok/s':>10} {'mean TTFT s':>12} {'wall s':>8} "
                     f"{'speedup':>8} {'of ideal':>8}")
        for name, r in res["throughput"].items():
            sp = res.get(f"speedup_{name}")
            extra = f"{sp:>7.2f}x {res[f'speedup_{name}_of_ideal']:>8.2f}" if sp is not None else f"{'1.00x':>8} {'':>8}"
            lines.append(f"    {name:<10} {r['requests_per_s']:>10.3f} {r['output_tokens_per_s']:>10.2f} "
                         f"{r['mean_ttft_s']:>12.2f} {r['wall_s']:>8.1f} {extra}")
        best = max(res.get("speedup_shared_of_ideal", 0), res.get("speedup_text_only_of_ideal", 0))
        lines.append(f"    ideal (layer FLOPs) speedup {res['ideal_prefill_speedup']:.2f}x; target 0.85 of it: "
                     f"{'met' if best >= 0.85 else 'not met'}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=None, help="MLP width (default 2 x hidden)")
    ap.add_argument("--image-size", type=int, default=144, help="pixels (6 px patches: 144 -> 576 image tokens)")
    ap.add_argument("--layer", type=int, default=None, help="K (default L/2)")
    ap.add_argument("--system-tokens", type=int, default=35, help="tokens before the image (BOS included)")
    ap.add_argument("--text-tokens", type=int, default=60, help="tokens after the image")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--kv-requests", type=int, default=8, help="(a): KV bytes = this many stock requests")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--tp", type=int, default=1, help="tensor parallel size (2: VLLM_CPU_OMP_THREADS_BIND='0|1')")
    ap.add_argument("--json", default=None)
    ap.add_argument("--quiet", action="store_true", help="the table only (no JSON dump on stdout)")
    args = ap.parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    global TP
    TP = args.tp
    if TP > 1:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i) for i in range(TP)))

    from vtw.vllm import tiny

    L = args.layers
    K = L // 2 if args.layer is None else args.layer
    g = min(K, L - K)
    if L % g or K % g:
        raise SystemExit("choose K so that min(K, L-K) divides K and L (vLLM groups layers in equal counts)")
    folder = tempfile.mkdtemp(prefix="vtw-vllm-bench-")
    tiny.build_llava(folder, layers=L, hidden=args.hidden, heads=args.heads, intermediate=args.intermediate or args.hidden * 2,
                     image_size=args.image_size, patch=6)
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(folder)
    words = "describe the shapes and colors".split()
    system = " ".join(words[i % 5] for i in range(max(args.system_tokens - 1, 0)))  # + BOS
    question = " ".join(words[i % 5] for i in range(args.text_tokens))
    prompt = f"{system} <image> {question}".strip()
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
    # the scheduler admits a request once its prompt's blocks fit (decode blocks come later): the
    # ratio at admission, from the prompt's slots alone
    ideal_admit = (_cdiv(n_tok, bs) * L) / (_cdiv(n_tok, bs) * K + _cdiv(n_text, bs) * (L - K))
    budget_units = args.kv_requests * stock_units
    res = dict(date=time.strftime("%Y-%m-%d"), tp=TP, layers=L, K=K, hidden=args.hidden, tokens=n_tok, text_tokens=n_text,
               new=args.new, block_size=bs, ideal_concurrency_ratio=ideal,
               ideal_concurrency_ratio_at_admission=ideal_admit, kv_budget_stock_requests=args.kv_requests)
    # (a) most requests running at once at equal KV bytes
    n_a = args.kv_requests * 4
    conc = {}
    for name, layer, kv, blocks in [("stock", None, None, budget_units // L + 1),
                                    ("text_only", K, "text_only", budget_units // g + 1)]:
        llm = _engine(folder, layer, kv, blocks, bs, max_len, 8192, 256)
        conc[name] = _workload(llm, n_a, args.new, prompt, image)["most_running"]
        _close(llm)
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
            _close(llm)
        res["throughput"] = thr
        from vtw.costs import prefill_flops

        # VTW.md's decoder-layer FLOPs (4nd^2 + 2n^2d + 3ndm per layer) of one prompt, full / withdrawn
        inter = args.intermediate or args.hidden * 2
        flops_ideal = (prefill_flops(n_tok, n_text, args.hidden, inter, L, None)
                       / prefill_flops(n_tok, n_text, args.hidden, inter, L, K))
        res["ideal_prefill_speedup"] = flops_ideal
        for name in ("shared", "text_only"):
            sp = thr[name]["requests_per_s"] / thr["stock"]["requests_per_s"]
            res[f"speedup_{name}"] = sp
            res[f"speedup_{name}_of_ideal"] = sp / flops_ideal
    if not args.quiet:
        print(json.dumps(res, indent=1))
    print(table(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
