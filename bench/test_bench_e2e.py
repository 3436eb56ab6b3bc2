"""End-to-end benchmarks of withdrawal on LLaVA-1.5-shaped models with random weights
(`vtw.bench`): prefill (time to first token, vision tower included) and decode (greedy steps on
the prefill's cache), the full model and `vtw.enable(model, K)` side by side in one group.

    python -m pytest bench/test_bench_e2e.py --benchmark-only -q \
        --benchmark-columns=median,iqr,rounds --benchmark-sort=name
    VTW_BENCH_THREADS=1 python -m pytest bench/test_bench_e2e.py --benchmark-only -k cpu

- CPU (always): preset ``small`` (8 layers, hidden 512, 576 image tokens), batch 2, K = 4 = L/2,
  35 system + 576 image + 60 text tokens (95 text), float32.
- GPU (skipped without CUDA; names contain ``gpu``): LLaVA-1.5-7B shape in bfloat16, prefill at
  batch 1, 8 and 32, decode at batch 1 and 32, K = 16. ``bash bench/gpu_check.sh`` runs the same
  shapes through ``python -m vtw bench`` instead (its table has the ideal and the ratio).

Throughput columns of the table bench/conftest.py prints: prefill in TFLOP/s (2 x the
multiply-adds of VTW.md's decoder formula + the vision tower, projector and head, over the median
time: the withdrawn model does less work, so its TFLOP/s is lower when its speedup is ideal);
decode in GB/s of the bytes model of `vtw.bench.decode_ideal` (weights + every layer's cache read
once per step), beside the memcpy ceiling on CPU. The withdrawn benchmark of each group also runs
alternating full / withdrawn calls and prints their ratio beside the ideal speedup (a change of
load during the run cannot decide it). Numbers and machines: bench/RESULTS.md.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from vtw import bench
from vtw.costs import sync

CPU_PRESET, CPU_BATCH = "small", 2
GPU_PRESET = "llava-1.5-7b"
NEW_TOKENS = {"cpu": 16, "cuda": 32}
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@pytest.fixture(scope="module")
def models():
    """One model in memory at a time, built on first use."""
    cache: dict = {}

    def get(preset: str, device: str):
        key = (preset, device)
        if key not in cache:
            cache.clear()
            if device == "cuda":
                torch.cuda.empty_cache()
            p = bench.PRESETS[preset]
            dtype = torch.bfloat16 if device == "cuda" else torch.float32
            cache[key] = (p, dtype, bench.build_model(p, device, dtype))
        return cache[key]

    yield get
    cache.clear()


def _sizes(p):
    n_text = bench.SYSTEM_TOKENS + bench.TEXT_TOKENS
    return n_text + p.image_tokens, n_text


def _timed_rounds(benchmark, fn, device, setup=None, budget_s=None):
    """pytest-benchmark rounds of `fn` (after one warm-up), about `budget_s` of calls, >= 3."""
    import os

    budget = float(os.environ.get("VTW_BENCH_BUDGET_S", "0.4")) if budget_s is None else budget_s
    args = setup() if setup else ()
    sync(device)
    t0 = time.perf_counter()
    fn(*args)
    sync(device)
    first = time.perf_counter() - t0
    rounds = int(min(50, max(3, budget / max(first, 1e-6))))

    def call(*a):
        fn(*a)
        sync(device)

    if setup:
        benchmark.pedantic(call, setup=lambda: (setup(), {}), rounds=rounds, iterations=1, warmup_rounds=0)
    else:
        benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=0)
    return benchmark.stats.stats.median


def _paired(run_full, run_cut, pairs: int) -> tuple[list[float], list[float]]:
    a, b = [], []
    for i in range(pairs):
        order = ((a, run_full), (b, run_cut)) if i % 2 == 0 else ((b, run_cut), (a, run_full))
        for out, run in order:
            out.append(run())
    return a, b


def _prefill(benchmark, models, preset, device, batch, K, mode):
    p, dtype, model = models(preset, device)
    n_all, n_text = _sizes(p)
    inputs = bench.make_inputs(p, batch, device=device, dtype=dtype)
    k = None if mode == "full" else K

    def run():
        return bench._prefill(model, inputs, p.image_token_id)

    def timed(mode_k):
        bench._set_mode(model, mode_k)
        sync(device)
        t0 = time.perf_counter()
        run()
        sync(device)
        return time.perf_counter() - t0

    benchmark.group = f"e2e prefill {p.name} B={batch} K={K} {device} {str(dtype).replace('torch.', '')}"
    benchmark.extra_info["impl"] = f"{mode} (K={K})" if k is not None else "full"
    benchmark.extra_info["threads"] = torch.get_num_threads()
    work = 2 * batch * (bench.decoder_flops(p, n_all, n_text, k) + bench.vision_flops(p) + bench.head_flops(p))
    bench._set_mode(model, k)
    try:
        median = _timed_rounds(benchmark, run, device)
        benchmark.extra_info["TFLOP/s"] = round(work / median / 1e12, 5)
        benchmark.extra_info["median_ms"] = round(median * 1e3, 3)
        if k is not None:
            full_s, cut_s, sp = _record_paired(benchmark, timed, K)
            idl = bench.ideal(p, n_all, n_text, K)
            benchmark.extra_info["note"] = (
                f"speedup full / withdrawn, paired: {sp:.2f}x; ideal {idl['decoder']:.2f}x (VTW.md decoder "
                f"FLOPs), {idl['end_to_end']:.2f}x (end to end); measured / ideal {sp / idl['decoder']:.2f}, "
                f"{sp / idl['end_to_end']:.2f}")
    finally:
        bench.disable(model)



def _record_paired(benchmark, timed, K, rounds: int = 3):
    """Alternating full / withdrawn calls (`timed(None)`, `timed(K)`): records the paired ratio in
    ``extra_info["paired"]``; returns (full times, withdrawn times, median speedup of the pairs)."""
    full_s, cut_s = _paired(lambda: timed(None), lambda: timed(K), rounds)
    benchmark.extra_info["paired"] = {
        "vs": "full", "ratio": round(statistics.median(cut_s) / statistics.median(full_s), 3),
        "min_ratio": round(min(cut_s) / min(full_s), 3), "rounds": len(cut_s)}
    return full_s, cut_s, statistics.median(f / c for f, c in zip(full_s, cut_s))


def _decode(benchmark, models, preset, device, batch, K, mode, memcpy_ceiling=None):
    p, dtype, model = models(preset, device)
    n_all, n_text = _sizes(p)
    new = NEW_TOKENS[device]
    inputs = bench.make_inputs(p, batch, device=device, dtype=dtype)
    k = None if mode == "full" else K
    elt = torch.empty((), dtype=dtype).element_size()
    counts = bench.param_count(p)
    weights = (counts["decoder"] + counts["head"]) * elt

    def setup():
        cache, tok = bench._prefill(model, inputs, p.image_token_id)
        sync(device)
        return cache, tok

    def steps(cache, tok):
        bench._decode(model, cache, tok, inputs["attention_mask"], new, p.image_token_id)

    def timed(mode_k):
        bench._set_mode(model, mode_k)
        args = setup()
        t0 = time.perf_counter()
        steps(*args)
        sync(device)
        return time.perf_counter() - t0

    benchmark.group = f"e2e decode {p.name} B={batch} K={K} {new} tokens {device} {str(dtype).replace('torch.', '')}"
    benchmark.extra_info["impl"] = f"{mode} (K={K})" if k is not None else "full"
    benchmark.extra_info["threads"] = torch.get_num_threads()
    model_bytes = bench.decode_ideal(p, batch, n_all, n_text, k, new, weights, elt)
    step_bytes = model_bytes["bytes_withdrawn"]  # k None: equal to the full model's
    bench._set_mode(model, k)
    try:
        median = _timed_rounds(benchmark, steps, device, setup=setup)
        gbs = step_bytes * new / median / 1e9
        benchmark.extra_info["GB/s"] = round(gbs, 2)
        benchmark.extra_info["tokens/s"] = round(batch * new / median, 2)
        if memcpy_ceiling:
            benchmark.extra_info["pct_of_memcpy"] = round(100 * gbs / memcpy_ceiling, 1)
        if k is not None:
            full_s, cut_s, sp = _record_paired(benchmark, timed, K)
            ideal = bench.decode_ideal(p, batch, n_all, n_text, K, new, weights, elt)["speedup"]
            benchmark.extra_info["note"] = (
                f"tokens/s withdrawn / full, paired: {sp:.2f}x; bytes-model ideal {ideal:.2f}x "
                f"({batch * new / statistics.median(full_s):.1f} -> {batch * new / statistics.median(cut_s):.1f} "
                "tokens/s)")
    finally:
        bench.disable(model)


@pytest.mark.parametrize("mode", ["full", "withdrawn"])
def test_e2e_prefill_cpu(benchmark, models, mode):
    p = bench.PRESETS[CPU_PRESET]
    _prefill(benchmark, models, CPU_PRESET, "cpu", CPU_BATCH, p.layers // 2, mode)


@pytest.mark.parametrize("mode", ["full", "withdrawn"])
def test_e2e_decode_cpu(benchmark, models, memcpy_ceiling, mode):
    p = bench.PRESETS[CPU_PRESET]
    _decode(benchmark, models, CPU_PRESET, "cpu", CPU_BATCH, p.layers // 2, mode, memcpy_ceiling)


@needs_cuda
@pytest.mark.parametrize("mode", ["full", "withdrawn"])
@pytest.mark.parametrize("batch", [1, 8, 32])
def test_e2e_prefill_gpu(benchmark, models, batch, mode):
    _prefill(benchmark, models, GPU_PRESET, "cuda", batch, 16, mode)


@needs_cuda
@pytest.mark.parametrize("mode", ["full", "withdrawn"])
@pytest.mark.parametrize("batch", [1, 32])
def test_e2e_decode_gpu(benchmark, models, batch, mode):
    _decode(benchmark, models, GPU_PRESET, "cuda", batch, 16, mode)
