"""The Triton withdraw and compact_kv_ kernels, against plain Python loops written here.

Without a GPU they run on CPU tensors under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so shapes stay tiny. Every comparison is bit-exact: tensors are compared
as integer words, and inputs are random bit patterns (NaNs with payloads, -0.0, infinities and
subnormals included), so a copy that went through float arithmetic would show.
"""

from __future__ import annotations

import os
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vtw_kernels

triton = pytest.importorskip("triton")
if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
    pytest.skip("Triton needs a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)

from vtw_kernels.triton import data  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
INT_OF = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
          torch.float64: torch.int64}


def random_bits(shape, dtype, gen):
    """Random bit patterns viewed as `dtype`: every float value class appears."""
    it = INT_OF[dtype]
    info = torch.iinfo(it)
    return torch.randint(info.min, info.max, shape, dtype=it, generator=gen).view(dtype).to(DEVICE)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(INT_OF[t.dtype]) if t.dtype in INT_OF else t


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor):
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    assert torch.equal(bits(a).cpu(), bits(b).cpu())


def loop_withdraw(hidden, mask, s_keep, pad_left):
    """withdraw written as the contract reads, one token at a time."""
    B, S, D = hidden.shape
    h, m = hidden.cpu(), mask.cpu()
    out = torch.zeros(B, s_keep, D, dtype=hidden.dtype)
    idx = torch.full((B, s_keep), -1, dtype=torch.long)
    lens = torch.zeros(B, dtype=torch.int32)
    for b in range(B):
        kept = [s for s in range(S) if not bool(m[b, s])]
        lens[b] = len(kept)
        first = s_keep - len(kept) if pad_left else 0
        for r, s in enumerate(kept):
            idx[b, first + r] = s
            out[b, first + r] = h[b, s]
    return out, idx, lens


def make_mask(B, S, gen, p=0.6):
    m = torch.rand(B, S, generator=gen) < p
    if B > 1:
        m[0] = True  # a row of visual tokens only
        m[1] = False  # a row of text only
    return m.to(DEVICE)


def check_withdraw(hidden, mask, num_keep, pad_left, **impl):
    res = data._withdraw_impl(hidden, mask, num_keep, pad_left, **impl) if impl else data.withdraw(
        hidden, mask, num_keep, pad_left)
    lens = (~mask.cpu()).sum(1)
    s_keep = num_keep if num_keep is not None else (int(lens.max()) if len(lens) else 0)
    out, idx, ln = loop_withdraw(hidden, mask, s_keep, pad_left)
    assert_bits_equal(res[0], out)
    assert torch.equal(res[1].cpu(), idx) and res[1].dtype == torch.int64
    assert torch.equal(res[2].cpu(), ln) and res[2].dtype == torch.int32
    assert res[0].device == hidden.device
    return res


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pad_left", [False, True])
@pytest.mark.parametrize("extra", [None, 0, 3], ids=["no_num_keep", "num_keep_exact", "num_keep_plus_3"])
def test_withdraw_matches_loop(dtype, pad_left, extra):
    gen = torch.Generator().manual_seed(1)
    B, S, D = 4, 19, 12
    hidden = random_bits((B, S, D), dtype, gen)
    mask = make_mask(B, S, gen)
    num_keep = None if extra is None else int((~mask).sum(1).max()) + extra
    check_withdraw(hidden, mask, num_keep, pad_left)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_withdraw_strided_inputs(dtype):
    gen = torch.Generator().manual_seed(2)
    # Non-contiguous rows and batch, an odd offset into the last dim (2-byte words only), and a
    # transposed mask.
    big = random_bits((3, 40, 17), dtype, gen)
    hidden = big[:, 1::2, 3:14]
    mask = make_mask(20, 3, gen).t()
    assert not hidden.is_contiguous() and not mask.is_contiguous()
    for pad_left in (False, True):
        check_withdraw(hidden, mask, None, pad_left)
        check_withdraw(hidden, mask, 21, pad_left)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_withdraw_several_tiles_and_hidden_splits(dtype):
    """Slots spread over several programs per row and the hidden dim over several programs."""
    gen = torch.Generator().manual_seed(3)
    hidden = random_bits((2, 23, 40), dtype, gen)
    mask = make_mask(2, 23, gen, p=0.3)
    mask[0, ::3] = False
    num_keep = int((~mask).sum(1).max()) + 2
    for pad_left in (False, True):
        check_withdraw(hidden, mask, num_keep, pad_left, block_j=4, d_splits=2)
        check_withdraw(hidden, mask, None, pad_left, block_j=8, d_splits=3)


def test_withdraw_wide_words_are_used_and_exact():
    """Aligned bf16 rows move as 8-byte words; unaligned ones as 2-byte words; both exact."""
    gen = torch.Generator().manual_seed(4)
    hidden = random_bits((2, 9, 16), torch.bfloat16, gen)
    assert data._word_size(2, (hidden.data_ptr(), 9 * 16 * 2, 16 * 2, 16 * 2)) == 8
    mask = make_mask(2, 9, gen)
    check_withdraw(hidden, mask, None, False)
    odd = hidden[:, :, 1:8]
    assert data._word_size(2, (odd.data_ptr(), 9 * 16 * 2, 16 * 2, 7 * 2)) == 2
    check_withdraw(odd, mask, 9, True)


@pytest.mark.parametrize("case", ["empty_batch", "no_tokens", "no_hidden", "all_visual_num_keep_0",
                                  "all_visual_padded", "one_token"])
def test_withdraw_edge_shapes(case):
    gen = torch.Generator().manual_seed(5)
    B, S, D, num_keep = {"empty_batch": (0, 7, 4, None), "no_tokens": (2, 0, 4, 3), "no_hidden": (3, 6, 0, None),
                         "all_visual_num_keep_0": (2, 5, 4, 0), "all_visual_padded": (2, 5, 4, 2),
                         "one_token": (1, 1, 1, None)}[case]
    hidden = random_bits((B, S, D), torch.float16, gen)
    mask = torch.rand(B, S, generator=gen).to(DEVICE) < 0.5
    if case.startswith("all_visual"):
        mask[:] = True
    for pad_left in (False, True):
        check_withdraw(hidden, mask, num_keep, pad_left)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pad_left", [False, True])
def test_withdraw_num_keep_too_small_is_reported_never_truncated(dtype, pad_left):
    gen = torch.Generator().manual_seed(6)
    B, S, D = 3, 11, 6
    hidden = random_bits((B, S, D), dtype, gen)
    mask = torch.zeros(B, S, dtype=torch.bool)
    mask[0, :8] = True  # keeps 3
    mask[1, 2:4] = True  # keeps 9  > num_keep
    mask[2, 5:] = True  # keeps 5
    mask = mask.to(DEVICE)
    num_keep = 6
    out, idx, lens = data.withdraw(hidden, mask, num_keep, pad_left)
    # The true counts, so keep_lens.max() > out.shape[1] tells on the device.
    assert lens.cpu().tolist() == [3, 9, 5]
    assert out.shape == (B, num_keep, D) and idx.shape == (B, num_keep)
    # The overflowing row is poisoned, never a truncated prefix.
    assert (idx[1].cpu() == -1).all()
    assert torch.isnan(out[1].float()).all()
    # The other rows are exact.
    ref_out, ref_idx, _ = loop_withdraw(hidden, mask, num_keep + 3, pad_left)
    for b in (0, 2):
        if pad_left:
            assert_bits_equal(out[b], ref_out[b, 3:])
            assert torch.equal(idx[b].cpu(), ref_idx[b, 3:])
        else:
            assert_bits_equal(out[b], ref_out[b, :num_keep])
            assert torch.equal(idx[b].cpu(), ref_idx[b, :num_keep])
    # The opt-in synchronous check raises the CPU path's error.
    with pytest.raises(ValueError, match=r"num_keep = 6 but row 1 keeps 9 tokens"):
        vtw_kernels.Withdrawn(out, idx, lens).check()
    with pytest.raises(ValueError, match=r"num_keep = 6 but row 1 keeps 9 tokens"):
        vtw_kernels.withdraw(hidden, mask, num_keep=num_keep, pad_left=pad_left, backend="triton").check()
    # The same error as the CPU / torch backends raise at once.
    with pytest.raises(ValueError, match=r"num_keep = 6 but row 1 keeps 9 tokens"):
        vtw_kernels.withdraw(hidden.cpu(), mask.cpu(), num_keep=num_keep, backend="torch")


def test_withdrawn_check_passes_through_a_valid_result():
    gen = torch.Generator().manual_seed(7)
    hidden = random_bits((2, 5, 3), torch.float32, gen)
    mask = make_mask(2, 5, gen)
    res = vtw_kernels.withdraw(hidden, mask, num_keep=5, backend="triton")
    assert res.check() is res
    empty = vtw_kernels.withdraw(hidden[:0], mask[:0], num_keep=2, backend="triton")
    assert empty.check() is empty


@settings(max_examples=40, deadline=None)
@given(B=st.integers(0, 3), S=st.integers(0, 24), D=st.integers(0, 9), p=st.floats(0, 1),
       pad_left=st.booleans(), extra=st.one_of(st.none(), st.integers(0, 3)),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_withdraw_property(B, S, D, p, pad_left, extra, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    hidden = random_bits((B, S, D), dtype, gen)
    mask = (torch.rand(B, S, generator=gen) < p).to(DEVICE)
    num_keep = None if extra is None else (int((~mask).sum(1).max()) if B else 0) + extra
    check_withdraw(hidden, mask, num_keep, pad_left)


# ---------------------------------------------------------------------------------- compact_kv_

def loop_compact_expectation(tensors, mask):
    """For each tensor: the rows the contract fixes after compaction, per (b, h)."""
    B, S = mask.shape
    m = mask.cpu()
    kept = [[s for s in range(S) if not bool(m[b, s])] for b in range(B)]
    expected = []
    for t in tensors:
        c = t.detach().cpu().clone()
        e = {}
        for b in range(B):
            for h in range(t.shape[1]):
                e[b, h] = c[b, h, kept[b]] if kept[b] else c[b, h, :0]
        expected.append(e)
    return kept, expected


def make_caches(B, H, S_cap, specs, gen, pad=(1, 3, 2)):
    """Cache tensors as views into larger buffers (so writes outside the views would show):
    specs is a list of (dtype, Dh)."""
    bufs, views = [], []
    for dtype, dh in specs:
        buf = random_bits((B, H + pad[0], S_cap + pad[1], dh + pad[2]), dtype, gen)
        bufs.append(buf)
        views.append(buf[:, :H, :S_cap, 1:1 + dh])
    return bufs, views


def check_compact(keys, values, mask, bufs, **kw):
    tensors = list(keys) + list(values)
    S = mask.shape[1]
    before_bufs = [b.clone() for b in bufs]
    kept, expected = loop_compact_expectation(tensors, mask)
    before_tail = [t[:, :, S:].clone() for t in tensors]
    new_lens = data.compact_kv_(keys, values, mask)
    assert new_lens.dtype == torch.int32 and new_lens.device == mask.device
    assert new_lens.cpu().tolist() == [len(k) for k in kept]
    for t, e, tail in zip(tensors, expected, before_tail):
        for (b, h), rows in e.items():
            assert_bits_equal(t[b, h, :len(kept[b])], rows)
        assert_bits_equal(t[:, :, S:], tail)  # positions >= S never touched
    # Nothing outside the views changed: mark the views' region [0, S) as "may change".
    for buf, before, t in zip(bufs, before_bufs, tensors):
        assert buf.is_contiguous() and t.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
        region = torch.zeros(buf.shape, dtype=torch.bool)
        region.as_strided(t.shape, t.stride(), t.storage_offset() - buf.storage_offset())[:, :, :S] = True
        region = region.to(buf.device)
        assert torch.equal(bits(buf)[~region], bits(before)[~region])
    return new_lens


def test_compact_kv_mixed_dtypes_and_head_dims():
    gen = torch.Generator().manual_seed(10)
    B, H, S, S_cap = 3, 2, 17, 20
    specs = [(torch.bfloat16, 8), (torch.float32, 6), (torch.float16, 5)]  # keys of 3 layers
    vspecs = [(torch.float16, 4), (torch.bfloat16, 7), (torch.float32, 8)]
    kbufs, keys = make_caches(B, H, S_cap, specs, gen)
    vbufs, values = make_caches(B, H, S_cap, vspecs, gen)
    mask = make_mask(B, S, gen, p=0.5)
    check_compact(keys, values, mask, kbufs + vbufs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_compact_kv_contiguous_layers_wide_words(dtype):
    """Contiguous, 16-byte-aligned caches (the aligned, vectorised configuration), two
    windows of tokens per stream."""
    gen = torch.Generator().manual_seed(11)
    B, H, S, S_cap, Dh = 2, 1, 70, 72, 8
    keys = [random_bits((B, H, S_cap, Dh), dtype, gen) for _ in range(2)]
    values = [random_bits((B, H, S_cap, Dh), dtype, gen) for _ in range(2)]
    mask = make_mask(B, S, gen, p=0.4)
    mask[1, 10:60] = True
    check_compact(keys, values, mask, keys + values)


def test_compact_kv_single_tensors_and_public_wrapper():
    gen = torch.Generator().manual_seed(12)
    B, H, S = 2, 3, 9
    k = random_bits((B, H, S, 4), torch.float16, gen)
    v = random_bits((B, H, S, 4), torch.float16, gen)
    mask = make_mask(B, S, gen)
    kept, (ek, ev) = loop_compact_expectation([k, v], mask)
    new_lens = vtw_kernels.compact_kv_(k, v, mask, backend="triton")
    assert new_lens.cpu().tolist() == [len(x) for x in kept]
    for (b, h), rows in ek.items():
        assert_bits_equal(k[b, h, :len(kept[b])], rows)
        assert_bits_equal(v[b, h, :len(kept[b])], ev[b, h])


@pytest.mark.parametrize("case", ["no_tensors", "empty_batch", "no_tokens", "no_heads", "zero_head_dim"])
def test_compact_kv_edge_shapes(case):
    gen = torch.Generator().manual_seed(13)
    B, H, S, S_cap, Dh = {"no_tensors": (2, 1, 5, 5, 4), "empty_batch": (0, 2, 5, 6, 4), "no_tokens": (2, 2, 0, 3, 4),
                          "no_heads": (2, 0, 5, 5, 4), "zero_head_dim": (2, 2, 5, 5, 0)}[case]
    mask = make_mask(B, S, gen) if B > 1 else (torch.rand(B, S, generator=gen) < 0.5).to(DEVICE)
    n = 0 if case == "no_tensors" else 2
    bufs, keys = make_caches(B, H, S_cap, [(torch.float16, Dh)] * n, gen)
    vbufs, values = make_caches(B, H, S_cap, [(torch.float32, Dh + 1)] * n, gen)
    check_compact(keys, values, mask, bufs + vbufs)


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 2), H=st.integers(1, 2), S=st.integers(0, 40), extra=st.integers(0, 3),
       layers=st.integers(1, 2), p=st.floats(0, 1), seed=st.integers(0, 2**16),
       dtypes=st.lists(st.sampled_from(DTYPES), min_size=2, max_size=2), dh=st.integers(1, 9))
def test_compact_kv_property(B, H, S, extra, layers, p, seed, dtypes, dh):
    gen = torch.Generator().manual_seed(seed)
    mask = (torch.rand(B, S, generator=gen) < p).to(DEVICE)
    kbufs, keys = make_caches(B, H, S + extra, [(dtypes[0], dh)] * layers, gen)
    vbufs, values = make_caches(B, H, S + extra, [(dtypes[1], dh + 1)] * layers, gen)
    check_compact(keys, values, mask, kbufs + vbufs)


# ------------------------------------------------------------------------------- registration

def test_triton_functions_take_the_schema_signature():
    import inspect

    assert list(inspect.signature(data.withdraw).parameters) == ["hidden", "visual_mask", "num_keep", "pad_left"]
    assert list(inspect.signature(data.compact_kv_).parameters) == ["keys", "values", "visual_mask"]
    assert set(data.__all__) == {"withdraw", "compact_kv_"}
    for op in ("withdraw", "compact_kv_"):
        assert "triton" in vtw_kernels.available_backends(op)


_AOT_SCRIPT = r"""
import re, sys
import triton, triton.language as tl
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as exc:
    print("NOAPI", exc); sys.exit(0)
from vtw_kernels.triton import data

target = GPUTarget("cuda", 90, 32)
div16 = [["tt.divisibility", 16]]
wide = re.compile(r"(ld|st)\.global\.(v4\.b32|v2\.b64)")
for word in ("i16", "i64"):
    sig = dict(h_ptr="*" + word, m_ptr="*u8", out_ptr="*" + word, idx_ptr="*i64", lens_ptr="*i32",
               S="i32", S_keep="i32", D="i32", hs0="i64", hs1="i32", ms0="i32", ms1="i32",
               tiles_per_row="i32", d_per_prog="i32", nan_word="i32",
               PAD_LEFT="constexpr", BLOCK_J="constexpr", BLOCK_S="constexpr", BLOCK_D="constexpr")
    names = list(sig)
    attrs = {(names.index(n),): div16 for n in ("h_ptr", "m_ptr", "out_ptr", "idx_ptr", "lens_ptr", "D",
                                                 "hs0", "hs1", "ms0", "d_per_prog")}
    for pad_left in (False, True):
        k = triton.compile(ASTSource(data._withdraw_kernel, sig, dict(PAD_LEFT=pad_left, BLOCK_J=16, BLOCK_S=256,
                                                                      BLOCK_D=128), attrs=attrs), target=target)
        assert wide.search(k.asm["ptx"]), f"withdraw ({word}) does not use 16-byte accesses"
for word, tl_word, vec in (("i16", tl.int16, 8), ("i32", tl.int32, 4), ("i64", tl.int64, 2)):
    sig = dict(meta_ptr="*i64", m_ptr="*u8", lens_ptr="*i32", B="i32", H="i32", S="i32", ms0="i32",
               ms1="i32", WORD="constexpr", VEC="constexpr", BLOCK_W="constexpr", BLOCK_D="constexpr")
    k = triton.compile(ASTSource(data._compact_kv_kernel, sig, dict(WORD=tl_word, VEC=vec, BLOCK_W=64, BLOCK_D=32),
                                 attrs={(0,): div16}), target=target, options=dict(num_warps=4, num_stages=1))
    ptx = k.asm["ptx"]
    # The explicit barrier (reductions add their own later, when lowered to LLVM) sits between
    # the load and the store of the moved data.
    ttgir = k.asm["ttgir"]
    at = [re.search(p, ttgir) for p in (r"%x\w* = tt\.load", r"\b(ttg|gpu)\.barrier\b", r"tt\.store %\w+, %x\w*")]
    assert all(at) and at[0].start() < at[1].start() < at[2].start(), f"compact_kv_ ({word}) lost its barrier"
    assert wide.search(ptx), f"compact_kv_ ({word}) does not use 16-byte accesses"
print("OK")
"""


def test_triton_kernels_compile_for_sm90():
    """The interpreter accepts programs the compiler rejects: compile both kernels ahead of time
    for Hopper (no GPU needed; in a process without TRITON_INTERPRET) and check what the
    correctness argument relies on: compact_kv_ keeps its barrier between loads and stores, and
    aligned data moves in 16-byte accesses."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    if proc.stdout.startswith("NOAPI"):
        pytest.skip(f"this Triton has no ahead-of-time compilation API: {proc.stdout.strip()}")
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout[-2000:] + proc.stderr[-4000:]


# ------------------------------------------------------------------------------- device guard

def test_every_triton_launch_is_guarded_by_the_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device, not the tensors': every launcher must enter
    on_device(tensor) around its launches. Without a GPU this checks that the guard is entered
    with the op's own tensor for each of the four ops (and that on_device builds the right CUDA
    guard); test_gpu_launch_on_a_device_that_is_not_current runs it for real on two GPUs."""
    import contextlib

    from vtw_kernels.triton import _device, attention

    entered = []

    def recording(t):
        entered.append(t)
        return contextlib.nullcontext()

    monkeypatch.setattr(data, "on_device", recording)
    monkeypatch.setattr(attention, "on_device", recording)
    gen = torch.Generator().manual_seed(0)
    hidden = random_bits((2, 5, 8), torch.float16, gen)
    mask = (torch.rand(2, 5, generator=gen) < 0.5).to(DEVICE)
    data.withdraw(hidden, mask, 5)
    assert entered and entered[-1] is hidden
    k, v = random_bits((2, 1, 6, 4), torch.float16, gen), random_bits((2, 1, 6, 4), torch.float16, gen)
    data.compact_kv_([k], [v], mask)
    assert entered[-1] is mask
    q = torch.randn(5, 2, 64, generator=gen).to(DEVICE)
    kk = torch.randn(5, 1, 64, generator=gen).to(DEVICE)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32, device=DEVICE)
    attention.varlen_attention(q, kk, kk, cu, cu, 3, 3)
    assert entered[-1] is q
    qd = torch.randn(2, 2, 64, generator=gen).to(DEVICE)
    kc = torch.randn(2, 1, 40, 64, generator=gen).to(DEVICE)
    attention.decode_attention(qd, kc, kc, torch.tensor([40, 3], dtype=torch.int32, device=DEVICE))
    assert entered[-1] is qd
    assert len(entered) == 4

    class OnCuda1:
        device = torch.device("cuda", 1)

    guard = _device.on_device(OnCuda1())
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1  # built without touching CUDA
    assert isinstance(_device.on_device(torch.empty(0)), contextlib.nullcontext)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_gpu_launch_on_a_device_that_is_not_current():
    # Tensors on cuda:1 while cuda:0 is current: every Triton op must run on cuda:1 and agree
    # with the same op on cuda:0.
    from vtw_kernels.triton import attention

    gen = torch.Generator().manual_seed(1)
    hidden = random_bits((3, 40, 64), torch.bfloat16, gen).cpu()
    mask = torch.rand(3, 40, generator=gen) < 0.5
    kv = random_bits((2, 3, 4, 48, 64), torch.float16, gen).cpu()
    q = torch.randn(30, 4, 128, generator=gen, dtype=torch.float16)
    k = torch.randn(30, 2, 128, generator=gen, dtype=torch.float16)
    cu = torch.tensor([0, 10, 30], dtype=torch.int32)
    qd = torch.randn(3, 4, 128, generator=gen, dtype=torch.float16)
    kc = torch.randn(3, 2, 300, 128, generator=gen, dtype=torch.float16)
    lens = torch.tensor([300, 7, 150], dtype=torch.int32)
    results = {}
    for dev in ("cuda:0", "cuda:1"):
        with torch.cuda.device(0):
            d = torch.device(dev)
            kvd = kv.to(d)
            new_lens = data.compact_kv_([kvd[0]], [kvd[1]], mask.to(d))
            out = [*data.withdraw(hidden.to(d), mask.to(d), 40), new_lens, kvd,
                   attention.varlen_attention(q.to(d), k.to(d), k.to(d), cu.to(d), cu.to(d), 20, 20),
                   attention.decode_attention(qd.to(d), kc.to(d), kc.to(d), lens.to(d))]
            torch.cuda.synchronize(d)
            assert all(t.device == d for t in out)
            results[dev] = [bits(t).cpu() for t in out]
    for a, b in zip(results["cuda:0"], results["cuda:1"]):
        assert torch.equal(a, b)
