"""Benchmarks of varlen_attention and decode_attention (pytest-benchmark; not tests).

    python -m pytest bench/test_bench_attention.py --benchmark-only \
        --benchmark-columns=median,iqr,rounds --benchmark-sort=name

GPU (skipped without CUDA), targets of issue 4 on an H100:
- prefill, equal lengths: vtw varlen >= 0.9x torch SDPA with the flash backend;
- prefill, ragged text lengths 20..300 (what withdrawal leaves): >= 1.3x SDPA-flash over the
  batch padded to its longest row (SDPA cannot skip the padding);
- decode: >= 80% of the device's copy bandwidth on the KV bytes read.
flash-attn's flash_attn_varlen_func is measured too where it imports.

CPU (runs anywhere): the C++ CPU backend against torch SDPA on CPU on the same shapes.

Every case records in ``extra_info`` its useful work: TFLOP/s (attention FLOPs 4*Lq*Lk*H*D
summed over sequences, halved when causal: padding is never counted as useful) or GB/s (K/V
bytes of the rows' real lengths), from the median time.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

import vtw_kernels

HAS_CUDA = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

try:  # optional comparison
    from flash_attn import flash_attn_varlen_func  # type: ignore
except Exception:  # noqa: BLE001  (any import failure: not installed, wrong CUDA, ...)
    flash_attn_varlen_func = None


def ragged_lengths(batch: int, lo: int = 20, hi: int = 300, seed: int = 0) -> list[int]:
    rnd = random.Random(seed)
    return [rnd.randint(lo, hi) for _ in range(batch)]


def attention_flops(lengths: list[int], heads: int, head_dim: int, causal: bool) -> float:
    f = sum(4.0 * n * n * heads * head_dim for n in lengths)
    return f / 2 if causal else f


def packed(lengths, hq, hkv, d, dtype, device):
    t = sum(lengths)
    q = torch.randn(t, hq, d, dtype=dtype, device=device)
    k = torch.randn(t, hkv, d, dtype=dtype, device=device)
    v = torch.randn(t, hkv, d, dtype=dtype, device=device)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32, device=device)
    return q, k, v, cu


def padded(lengths, hq, hkv, d, dtype, device):
    """[B, H, S_max, D] tensors, the layout SDPA takes (right padding; with a causal mask the
    real queries never see the padding keys, which lie in their future)."""
    s = max(lengths)
    B = len(lengths)
    q = torch.randn(B, hq, s, d, dtype=dtype, device=device)
    k = torch.randn(B, hkv, s, d, dtype=dtype, device=device)
    v = torch.randn(B, hkv, s, d, dtype=dtype, device=device)
    return q, k, v


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def run(benchmark, fn, device, work: float, unit: str, rounds: int | None = None):
    fn()  # warm-up / compile
    _sync(device)

    def call():
        fn()
        _sync(device)

    if rounds is None:
        benchmark(call)
    else:
        benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median
    if unit == "TFLOP/s":
        benchmark.extra_info["TFLOP/s"] = round(work / median / 1e12, 4)
    else:
        benchmark.extra_info["GB/s"] = round(work / median / 1e9, 2)
    benchmark.extra_info["median_ms"] = round(median * 1e3, 4)


# ----------------------------------------------------------------------------------------------
# GPU: prefill
# ----------------------------------------------------------------------------------------------

PREFILL_CASES = {
    "equal-8x1024": [1024] * 8,
    "equal-32x256": [256] * 32,
    "ragged-64x20..300": ragged_lengths(64),
}
GPU_HEADS = (32, 8, 128)  # Hq, Hkv, D (Llama-3-8B-like)


def _gpu_impl(name, lengths, dtype, causal):
    hq, hkv, d = GPU_HEADS
    if name == "sdpa-flash":
        q, k, v = padded(lengths, hq, hkv, d, dtype, "cuda")
        k, v = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)  # flash takes Hq == Hkv

        def fn():
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return fn
    q, k, v, cu = packed(lengths, hq, hkv, d, dtype, "cuda")
    m = max(lengths)
    if name == "flash-attn":
        return lambda: flash_attn_varlen_func(q, k, v, cu, cu, m, m, causal=causal)
    return lambda: vtw_kernels.varlen_attention(q, k, v, cu, cu, m, m, causal=causal, backend=name)


@pytest.mark.parametrize("impl", ["triton", "sdpa-flash", "flash-attn"])
@pytest.mark.parametrize("case", list(PREFILL_CASES))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.gpu
@needs_gpu
def test_gpu_prefill(benchmark, dtype, causal, case, impl):
    if impl == "flash-attn" and flash_attn_varlen_func is None:
        pytest.skip("flash-attn does not import here")
    lengths = PREFILL_CASES[case]
    benchmark.group = f"prefill {case} {'causal' if causal else 'full'} {dtype}"
    fn = _gpu_impl(impl, lengths, dtype, causal)
    run(benchmark, fn, "cuda", attention_flops(lengths, GPU_HEADS[0], GPU_HEADS[2], causal), "TFLOP/s")


# ----------------------------------------------------------------------------------------------
# GPU: decode
# ----------------------------------------------------------------------------------------------

DECODE_CASES = {
    "64 rows x 4096": [4096] * 64,
    "ragged 64 rows 100..4096": [random.Random(1).randint(100, 4096) for _ in range(64)],
    "1 long row 32768 + 7 short": [32768] + [128] * 7,
}


def kv_bytes(lengths, hkv, d, dtype) -> float:
    return 2.0 * sum(lengths) * hkv * d * torch.empty((), dtype=dtype).element_size()


@pytest.mark.parametrize("impl", ["triton", "sdpa-padded", "copy"])
@pytest.mark.parametrize("case", list(DECODE_CASES))
@pytest.mark.gpu
@needs_gpu
def test_gpu_decode(benchmark, case, impl):
    dtype = torch.bfloat16
    hq, hkv, d = GPU_HEADS
    lengths = DECODE_CASES[case]
    B, s_cap = len(lengths), max(lengths)
    benchmark.group = f"decode {case}"
    q = torch.randn(B, hq, d, dtype=dtype, device="cuda")
    kc = torch.randn(B, hkv, s_cap, d, dtype=dtype, device="cuda")
    vc = torch.randn(B, hkv, s_cap, d, dtype=dtype, device="cuda")
    lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    work = kv_bytes(lengths, hkv, d, dtype)
    if impl == "triton":
        fn = lambda: vtw_kernels.decode_attention(q, kc, vc, lens, backend="triton")  # noqa: E731
    elif impl == "sdpa-padded":
        # SDPA over the padded caches with a length mask (what a padded batch runs).
        mask = (torch.arange(s_cap, device="cuda")[None, :] < lens[:, None])[:, None, None, :]
        q4 = q[:, :, None]
        fn = lambda: F.scaled_dot_product_attention(q4, kc, vc, attn_mask=mask, enable_gqa=True)  # noqa: E731
    else:
        # The ceiling: a device copy of as many bytes as the KV the rows really hold.
        n = int(work // 2)
        src = torch.empty(n, dtype=torch.int16, device="cuda")
        dst = torch.empty_like(src)
        fn = lambda: dst.copy_(src)  # noqa: E731
    run(benchmark, fn, "cuda", work, "GB/s")


# ----------------------------------------------------------------------------------------------
# CPU: the C++ backend against torch SDPA on CPU (small shapes; runs on any machine)
# ----------------------------------------------------------------------------------------------

CPU_HEADS = (8, 2, 64)
CPU_PREFILL = {"equal-4x256": [256] * 4, "ragged-8x20..300": ragged_lengths(8)}


@pytest.mark.parametrize("impl", ["cpu", "sdpa-padded"])
@pytest.mark.parametrize("case", list(CPU_PREFILL))
def test_cpu_prefill(benchmark, case, impl):
    hq, hkv, d = CPU_HEADS
    lengths = CPU_PREFILL[case]
    dtype = torch.float32
    benchmark.group = f"cpu prefill causal {case} fp32"
    if impl == "cpu":
        q, k, v, cu = packed(lengths, hq, hkv, d, dtype, "cpu")
        m = max(lengths)
        fn = lambda: vtw_kernels.varlen_attention(q, k, v, cu, cu, m, m, causal=True, backend="cpu")  # noqa: E731
    else:
        q, k, v = padded(lengths, hq, hkv, d, dtype, "cpu")
        fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
    run(benchmark, fn, "cpu", attention_flops(lengths, hq, d, True), "TFLOP/s", rounds=10)


@pytest.mark.parametrize("impl", ["cpu", "sdpa-padded"])
def test_cpu_decode(benchmark, impl):
    hq, hkv, d = CPU_HEADS
    lengths = [2048, 100, 700, 1500, 33, 2048, 900, 400]
    B, s_cap = len(lengths), max(lengths)
    dtype = torch.float32
    benchmark.group = "cpu decode 8 rows ragged 33..2048 fp32"
    q = torch.randn(B, hq, d, dtype=dtype)
    kc = torch.randn(B, hkv, s_cap, d, dtype=dtype)
    vc = torch.randn(B, hkv, s_cap, d, dtype=dtype)
    lens = torch.tensor(lengths, dtype=torch.int32)
    if impl == "cpu":
        fn = lambda: vtw_kernels.decode_attention(q, kc, vc, lens, backend="cpu")  # noqa: E731
    else:
        mask = (torch.arange(s_cap)[None, :] < lens[:, None])[:, None, None, :]
        q4 = q[:, :, None]
        fn = lambda: F.scaled_dot_product_attention(q4, kc, vc, attn_mask=mask, enable_gqa=True)  # noqa: E731
    run(benchmark, fn, "cpu", kv_bytes(lengths, hkv, d, dtype), "GB/s", rounds=20)
