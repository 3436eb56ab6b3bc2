"""GPU benchmarks of withdraw and compact_kv_: the CUDA and Triton kernels against the plain
PyTorch ways of doing the same, at LLaVA-1.5 shapes (671 tokens: 35 system, 576 image, 60
text; hidden 4096; bfloat16), and KV caches of 32 layers (32 heads of 128).

Skipped without a CUDA device. Timing: each round runs the operation `INNER` times back to back
and then synchronises the device (`torch.cuda.synchronize`), so a round's wall time covers
every launch and all the device work; the per-call time is the round's median / INNER. The
achieved GB/s counts the bytes the operation must read and write (the same count for every
implementation of a group, so the column compares like with like), beside the device-to-device
copy bandwidth measured in the same run (`torch.clone` of a 1 GiB tensor; read + write).

    pytest bench/test_bench_gpu_data.py --benchmark-only          (or bench/gpu_check.sh)
"""

from __future__ import annotations

import statistics

import pytest
import torch

import vtw_kernels
from vtw_kernels import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

S, SYS, IMG = 671, 35, 576  # tokens: system prompt, image, then text
TEXT = S - SYS - IMG
D = 4096
LAYERS, HEADS, HEAD_DIM = 32, 32, 128
INNER = 20  # calls per timed round
ROUNDS = 25
_COPY: dict[str, float] = {}


@pytest.fixture(scope="module")
def gpu_copy_gbs(request) -> float:
    """Device-to-device copy bandwidth (GB/s, bytes read + written) of this GPU, now: the
    median over 10 events-timed `torch.clone`s of a 1 GiB tensor."""
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    x.fill_(1)
    for _ in range(3):
        x.clone()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        y = x.clone()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
        del y
    _COPY["clone"] = 2 * x.numel() / statistics.median(times) / 1e9
    del x
    torch.cuda.empty_cache()
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        tr.write_line(f"\n[vtw] {torch.cuda.get_device_name()}: device copy (torch.clone, 1 GiB) "
                      f"{_COPY['clone']:.0f} GB/s read + write")
    return _COPY["clone"]


def time_gpu(benchmark, fn, bytes_moved: float, ceiling: float, impl: str) -> None:
    """Runs rounds of INNER calls + one synchronisation; records per-call median and GB/s."""
    def round_():
        for _ in range(INNER):
            fn()
        torch.cuda.synchronize()

    round_()  # warm-up (Triton compiles, torch.compile traces, the allocator settles)
    benchmark.pedantic(round_, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    per_call = benchmark.stats.stats.median / INNER
    gbs = bytes_moved / per_call / 1e9
    benchmark.extra_info.update({
        "impl": f"{impl} (median / {INNER} calls: {per_call * 1e6:.1f} us)",
        "us_per_call": round(per_call * 1e6, 2),
        "MB_moved": round(bytes_moved / 1e6, 3),
        "GB/s": round(gbs, 1),
        "copy_GB/s": round(ceiling, 1),
        "pct_of_memcpy": round(100 * gbs / ceiling, 1),
        "device": torch.cuda.get_device_name(),
    })


def llava_batch(B: int):
    """Hidden states and masks of B LLaVA-1.5 prompts (same layout in every row, so every
    torch alternative below is valid; all rows keep SYS + TEXT tokens)."""
    g = torch.Generator(device="cuda").manual_seed(B)
    hidden = torch.randn(B, S, D, dtype=torch.bfloat16, device="cuda", generator=g)
    mask = torch.zeros(B, S, dtype=torch.bool, device="cuda")
    mask[:, SYS:SYS + IMG] = True
    return hidden, mask


WITHDRAW_IMPLS = ["cuda", "triton", "torch_reference", "bool_index", "cat_slices", "index_select", "gather"]


@pytest.mark.parametrize("impl", WITHDRAW_IMPLS)
@pytest.mark.parametrize("B", [1, 8, 32])
def test_gpu_withdraw(benchmark, gpu_copy_gbs, B, impl):
    hidden, mask = llava_batch(B)
    keep = SYS + TEXT
    benchmark.group = f"gpu withdraw B={B} S={S} D={D} bf16 (keeps {keep} tokens per row)"
    positions = torch.cat([torch.arange(SYS), torch.arange(SYS + IMG, S)]).cuda()
    if impl == "cuda":
        if "cuda" not in vtw_kernels.available_backends("withdraw"):
            pytest.skip("no CUDA kernel built")
        fn = lambda: torch.ops.vtw.withdraw(hidden, mask, keep, False)[0]  # noqa: E731
    elif impl == "triton":
        from vtw_kernels.triton import data

        fn = lambda: data.withdraw(hidden, mask, keep, False)[0]  # noqa: E731
    elif impl == "torch_reference":
        fn = lambda: reference.withdraw(hidden, mask, keep, False)[0]  # noqa: E731
    elif impl == "bool_index":  # packs the kept rows; valid because every row keeps `keep`
        fn = lambda: hidden[~mask].view(B, keep, D)  # noqa: E731
    elif impl == "cat_slices":  # the paper's code: fixed offsets
        fn = lambda: torch.cat([hidden[:, :SYS], hidden[:, SYS + IMG:]], dim=1)  # noqa: E731
    elif impl == "index_select":  # shared positions, computed from the mask each call
        fn = lambda: hidden.index_select(1, (~mask[0]).nonzero().squeeze(1))  # noqa: E731
    else:  # gather with per-row positions from a stable sort of the mask
        def fn():
            order = torch.sort(mask.to(torch.uint8), dim=1, stable=True).indices[:, :keep]
            return hidden.gather(1, order[..., None].expand(B, keep, D))
    assert torch.equal(fn().view(torch.int16), hidden[:, positions].view(torch.int16)), impl
    bytes_moved = 2 * B * keep * D * hidden.element_size()  # read the kept rows, write them
    time_gpu(benchmark, fn, bytes_moved, gpu_copy_gbs, impl)


COMPACT_IMPLS = ["cuda", "triton", "torch_reference", "index_select_new", "cat_slices_new", "bool_index_new"]


@pytest.mark.parametrize("impl", COMPACT_IMPLS)
@pytest.mark.parametrize("B", [1, 8])
def test_gpu_compact_kv(benchmark, gpu_copy_gbs, B, impl):
    """In place over 32 layers of keys and values [B, 32, 671, 128] bf16. The "_new"
    alternatives build new, compacted tensors per layer (what model code usually does)."""
    g = torch.Generator(device="cuda").manual_seed(100 + B)
    keys = [torch.randn(B, HEADS, S, HEAD_DIM, dtype=torch.bfloat16, device="cuda", generator=g)
            for _ in range(LAYERS)]
    values = [torch.randn(B, HEADS, S, HEAD_DIM, dtype=torch.bfloat16, device="cuda", generator=g)
              for _ in range(LAYERS)]
    mask = torch.zeros(B, S, dtype=torch.bool, device="cuda")
    mask[:, SYS:SYS + IMG] = True
    keep_pos = (~mask[0]).nonzero().squeeze(1)
    benchmark.group = f"gpu compact_kv_ {LAYERS} layers K+V [B={B}, {HEADS}, {S}, {HEAD_DIM}] bf16"
    tensors = keys + values
    expected = [t[:, :, keep_pos].clone() for t in tensors[:2]]
    if impl == "cuda":
        if "cuda" not in vtw_kernels.available_backends("compact_kv_"):
            pytest.skip("no CUDA kernel built")
        fn = lambda: torch.ops.vtw.compact_kv_(keys, values, mask)  # noqa: E731
    elif impl == "triton":
        from vtw_kernels.triton import data

        fn = lambda: data.compact_kv_(keys, values, mask)  # noqa: E731
    elif impl == "torch_reference":
        fn = lambda: reference.compact_kv_(keys, values, mask)  # noqa: E731
    elif impl == "index_select_new":
        fn = lambda: [t.index_select(2, (~mask[0]).nonzero().squeeze(1)) for t in tensors]  # noqa: E731
    elif impl == "cat_slices_new":
        fn = lambda: [torch.cat([t[:, :, :SYS], t[:, :, SYS + IMG:]], dim=2) for t in tensors]  # noqa: E731
    else:
        fn = lambda: [t[:, :, ~mask[0]] for t in tensors]  # noqa: E731
    res = fn()
    got = res[:2] if isinstance(res, list) else [t[:, :, :len(keep_pos)] for t in tensors[:2]]
    for a, b in zip(got, expected):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16)), impl
    # Bytes that must move: the text tokens after the image (the system prompt stays in place).
    bytes_moved = 2 * 2 * LAYERS * B * HEADS * TEXT * HEAD_DIM * 2
    time_gpu(benchmark, fn, bytes_moved, gpu_copy_gbs, impl)
