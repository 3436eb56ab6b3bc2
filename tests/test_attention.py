"""varlen_attention and decode_attention: every backend (torch reference, C++ CPU, Triton under
the interpreter on CPU tensors, Triton on a GPU when there is one) against float64 references
written here, per sequence and per head, from CONTRACT.md (not from vtw_kernels/reference.py);
bad inputs; NaN planted where nothing may be read; opcheck and torch.compile on the CPU ops.

Tolerances follow the dtype of the inputs, against float64 computed from the same (rounded)
inputs: float32 1e-5; float16 1e-3 (the output is rounded to float16, 2^-11 relative, and the
GPU-style kernels round the probabilities to float16 before P @ V, as FlashAttention does);
bfloat16 1e-2 (GPU only: bfloat16 arithmetic is broken in Triton's interpreter).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

import vtw_kernels
from vtw_kernels import reference
from vtw_kernels.triton import attention as tri

HAS_CUDA = torch.cuda.is_available()
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-2, 1e-2)}
CPU_BACKENDS = ("torch", "cpu", "triton")  # triton: the interpreter (conftest sets TRITON_INTERPRET=1)


def cu(lengths) -> torch.Tensor:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32)


# ----------------------------------------------------------------------------------------------
# float64 references, written from the contract
# ----------------------------------------------------------------------------------------------


def softmax_rows64(s: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Row softmax restricted to `allowed`; a row with nothing allowed is all zeros."""
    p = torch.zeros_like(s)
    for i in range(s.shape[0]):
        idx = allowed[i].nonzero().flatten()
        if idx.numel():
            x = s[i, idx]
            e = torch.exp(x - x.max())
            p[i, idx] = e / e.sum()
    return p


def ref_varlen64(q, k, v, cu_q, cu_k, scale=None, causal=True):
    Tq, Hq, D = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.zeros(Tq, Hq, D, dtype=torch.float64)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b in range(len(cq) - 1):
        lq, lk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        if lq == 0:
            continue
        i = torch.arange(lq)[:, None]
        j = torch.arange(lk)[None, :]
        # bottom-right aligned: query i of lq sees key j of lk iff j <= i + lk - lq
        allowed = (j <= i + (lk - lq)) if causal else torch.ones(lq, lk, dtype=torch.bool)
        for h in range(Hq):
            qs = q[cq[b]:cq[b + 1], h].double()
            ks = k[ck[b]:ck[b + 1], h // group].double()
            vs = v[ck[b]:ck[b + 1], h // group].double()
            p = softmax_rows64(qs @ ks.T * scale, allowed.expand(lq, lk))
            out[cq[b]:cq[b + 1], h] = p @ vs
    return out


def ref_decode64(q, k_cache, v_cache, lens, scale=None):
    B, Hq, D = q.shape
    group = Hq // k_cache.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.zeros(B, Hq, D, dtype=torch.float64)
    for b, n in enumerate(lens.tolist()):
        for h in range(Hq):
            ks = k_cache[b, h // group, :n].double()
            vs = v_cache[b, h // group, :n].double()
            s = (q[b, h].double() @ ks.T * scale)[None]
            out[b, h] = (softmax_rows64(s, torch.ones_like(s, dtype=torch.bool)) @ vs)[0]
    return out


def assert_close(actual, expected64, dtype, what=""):
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype} != {dtype}"
    atol, rtol = TOL[dtype]
    a = actual.double().cpu()
    assert torch.isfinite(a).all(), f"{what}: non-finite output at {(~torch.isfinite(a)).nonzero()[:5].tolist()}"
    err = (a - expected64).abs()
    bound = atol + rtol * expected64.abs()
    if not (err <= bound).all():
        worst = (err - bound).argmax()
        raise AssertionError(f"{what}: max abs error {err.max().item():.3g}; worst element {worst.item()} "
                             f"got {a.flatten()[worst].item():.6g} expected {expected64.flatten()[worst].item():.6g}")


def make_varlen(lq, lk, hq, hkv, d, dtype, device="cpu", seed=0, pad_q=0, pad_k=0):
    """Packed q [sum(lq) + pad_q, hq, d], k/v [sum(lk) + pad_k, hkv, d]; padding tokens are NaN."""
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(lq), sum(lk)
    q = torch.randn(tq + pad_q, hq, d, generator=g).to(dtype)
    k = torch.randn(tk + pad_k, hkv, d, generator=g).to(dtype)
    v = torch.randn(tk + pad_k, hkv, d, generator=g).to(dtype)
    q[tq:] = float("nan")
    k[tk:] = float("nan")
    v[tk:] = float("nan")
    return q.to(device), k.to(device), v.to(device), cu(lq).to(device), cu(lk).to(device)


def make_cache(lens, hq, hkv, s_cap, d, dtype, device="cpu", seed=0):
    """q [B, hq, d] and caches [B, hkv, s_cap, d] with NaN planted at every position >= lens[b]."""
    g = torch.Generator().manual_seed(seed)
    B = len(lens)
    q = torch.randn(B, hq, d, generator=g).to(dtype)
    kc = torch.randn(B, hkv, s_cap, d, generator=g).to(dtype)
    vc = torch.randn(B, hkv, s_cap, d, generator=g).to(dtype)
    for b, n in enumerate(lens):
        kc[b, :, max(n, 0):] = float("nan")
        vc[b, :, max(n, 0):] = float("nan")
    return q.to(device), kc.to(device), vc.to(device), torch.tensor(lens, dtype=torch.int32, device=device)


def test_backends_listed():
    assert "triton" in vtw_kernels.available_backends("varlen_attention")
    assert "cpu" in vtw_kernels.available_backends("varlen_attention")
    assert "cpu" in vtw_kernels.available_backends("decode_attention")


# ----------------------------------------------------------------------------------------------
# varlen_attention
# ----------------------------------------------------------------------------------------------

# Lengths 1, odd, a few hundred, empty; fewer queries than keys (chunked prefill); more queries
# than keys (the first rows see nothing and get zeros); a sequence with queries and no keys.
RAGGED_Q = [1, 7, 260, 0, 5, 6, 3]
RAGGED_K = [1, 9, 260, 4, 33, 2, 0]


@functools.lru_cache(maxsize=None)
def _ragged_case(dtype, causal):
    q, k, v, cq, ck = make_varlen(RAGGED_Q, RAGGED_K, 4, 2, 64, dtype, pad_q=3, pad_k=5)
    return (q, k, v, cq, ck), ref_varlen64(q, k, v, cq, ck, causal=causal)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_ragged(backend, dtype, causal):
    (q, k, v, cq, ck), exp = _ragged_case(dtype, causal)
    out = vtw_kernels.varlen_attention(q, k, v, cq, ck, max(RAGGED_Q), max(RAGGED_K), causal=causal,
                                       backend=backend)
    assert out.shape == q.shape
    assert_close(out, exp, dtype, f"{backend} {dtype} causal={causal}")
    # The padding tokens of the packed query buffer (NaN in q) belong to no sequence: zeros.
    assert torch.equal(out[sum(RAGGED_Q):], torch.zeros_like(out[sum(RAGGED_Q):]))


def test_varlen_rows_without_keys_are_zero():
    # Causal with 6 queries over 2 keys: rows 0..3 see nothing (FlashAttention-2: zeros).
    q, k, v, cq, ck = make_varlen([6], [2], 2, 1, 64, torch.float32)
    for backend in CPU_BACKENDS:
        out = vtw_kernels.varlen_attention(q, k, v, cq, ck, 6, 2, backend=backend)
        assert torch.equal(out[:4], torch.zeros_like(out[:4])), backend
        assert (out[4:].abs().sum(-1) > 0).all(), backend


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_varlen_gqa(backend, group):
    hkv = 2 if group <= 2 else 1
    lq, lk = [13, 40, 1], [29, 40, 5]
    q, k, v, cq, ck = make_varlen(lq, lk, hkv * group, hkv, 64, torch.float32, seed=group)
    out = vtw_kernels.varlen_attention(q, k, v, cq, ck, 40, 40, backend=backend)
    assert_close(out, ref_varlen64(q, k, v, cq, ck), torch.float32, f"{backend} group={group}")


@pytest.mark.parametrize("d", [64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240, 256])
def test_varlen_every_head_dim_cpu(d):
    lq, lk = [3, 20], [8, 20]
    q, k, v, cq, ck = make_varlen(lq, lk, 2, 1, d, torch.float32, seed=d)
    exp = ref_varlen64(q, k, v, cq, ck)
    for backend in ("torch", "cpu"):
        out = vtw_kernels.varlen_attention(q, k, v, cq, ck, 20, 20, backend=backend)
        assert_close(out, exp, torch.float32, f"{backend} D={d}")


@pytest.mark.parametrize("d", [80, 112, 144, 256])
def test_varlen_padded_head_dims_triton(d):
    # Head dims that are not powers of two run padded to the next one, with masked loads.
    lq, lk = [3, 20], [8, 20]
    q, k, v, cq, ck = make_varlen(lq, lk, 2, 1, d, torch.float32, seed=d)
    out = vtw_kernels.varlen_attention(q, k, v, cq, ck, 20, 20, backend="triton")
    assert_close(out, ref_varlen64(q, k, v, cq, ck), torch.float32, f"triton D={d}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_varlen_strided_inputs_and_scale(backend):
    # q, k, v as views into one packed [T, 3, H, D] buffer (strides, not contiguous).
    lens = [11, 4]
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(sum(lens), 3, 4, 96, generator=g)
    q, k, v = qkv[:, 0], qkv[:, 1, :2], qkv[:, 2, :2]
    assert not q.is_contiguous()
    cq = cu(lens)
    out = vtw_kernels.varlen_attention(q, k, v, cq, cq, 11, 11, softmax_scale=0.3, backend=backend)
    assert_close(out, ref_varlen64(q, k, v, cq, cq, scale=0.3), torch.float32, backend)


def test_varlen_triton_tiny_blocks():
    # Blocks of 16: several query blocks per program, unmasked and masked key blocks, the
    # diagonal crossing block boundaries with fewer queries than keys.
    lq, lk = [37, 50, 16], [61, 50, 3]
    q, k, v, cq, ck = make_varlen(lq, lk, 2, 2, 64, torch.float32, seed=5)
    for causal in (True, False):
        out = tri._varlen_launch(q, k, v, cq, ck, 50, None, causal, block_m=16, block_n=16)
        assert_close(out, ref_varlen64(q, k, v, cq, ck, causal=causal), torch.float32, f"causal={causal}")


def test_varlen_max_seqlen_too_small():
    # max_seqlen_q sizes the grid (FlashAttention's convention). Below the longest sequence,
    # the CPU and reference backends raise; Triton cannot check without a synchronisation and
    # marks the rows no program covers with NaN rather than dropping them silently.
    lq = [37, 10]
    q, k, v, cq, ck = make_varlen(lq, lq, 2, 1, 64, torch.float32, seed=6)
    for backend in ("torch", "cpu"):
        with pytest.raises(ValueError, match="max_seqlen_q = 16 is smaller than the length 37 of sequence 0"):
            vtw_kernels.varlen_attention(q, k, v, cq, ck, 16, 37, backend=backend)
    out = tri._varlen_launch(q, k, v, cq, ck, 16, None, True, block_m=16, block_n=16)
    exp = ref_varlen64(q, k, v, cq, ck)
    assert torch.isnan(out[16:37]).all()
    assert_close(out[:16], exp[:16], torch.float32, "covered rows of sequence 0")
    assert_close(out[37:], exp[37:], torch.float32, "sequence 1")


def test_varlen_empty():
    for backend in CPU_BACKENDS:
        # No sequence at all.
        q, k, v, cq, ck = make_varlen([], [], 2, 1, 64, torch.float32)
        out = vtw_kernels.varlen_attention(q, k, v, cq, ck, 0, 0, backend=backend)
        assert out.shape == (0, 2, 64)
        # Sequences that are all empty, with padding tokens in the buffers.
        q, k, v, cq, ck = make_varlen([0, 0], [0, 3], 2, 1, 64, torch.float32, pad_q=2)
        out = vtw_kernels.varlen_attention(q, k, v, cq, ck, 0, 3, backend=backend)
        assert torch.equal(out, torch.zeros_like(out)), backend


def test_nan_inside_a_sequence_propagates_on_cpu():
    # NaN in a query that is part of a sequence is data, not padding: it must show, not vanish.
    q, k, v, cq, ck = make_varlen([3, 4], [3, 4], 2, 1, 64, torch.float32)
    q[4, 1, 7] = float("nan")
    for backend in ("torch", "cpu"):
        out = vtw_kernels.varlen_attention(q, k, v, cq, ck, 4, 4, backend=backend)
        assert torch.isnan(out[4, 1]).all(), backend
        assert torch.isfinite(out[:4]).all() and torch.isfinite(out[5:]).all() and torch.isfinite(out[4, 0]).all()


def test_varlen_length_values_checked_on_cpu():
    q, k, v, cq, ck = make_varlen([4, 3], [4, 3], 2, 1, 64, torch.float32)
    bad = {
        "cu_seqlens_q must be non-decreasing": (torch.tensor([0, 5, 3], dtype=torch.int32), ck, 9, 4),
        r"cu_seqlens_q\[-1\] = 9 exceeds the number of tokens of q \(7\)": (torch.tensor([0, 4, 9], dtype=torch.int32), ck, 5, 4),
        "exceeds the number of tokens of k": (cq, torch.tensor([0, 4, 9], dtype=torch.int32), 4, 5),
        "max_seqlen_q = 3 is smaller": (cq, ck, 3, 4),
        "max_seqlen_k = 2 is smaller": (cq, ck, 4, 2),
    }
    for backend in ("torch", "cpu"):
        for msg, (cq_, ck_, mq, mk) in bad.items():
            with pytest.raises(ValueError, match=msg):
                vtw_kernels.varlen_attention(q, k, v, cq_, ck_, mq, mk, backend=backend)


def test_varlen_triton_bad_key_range_is_nan_not_out_of_bounds():
    # Without a synchronisation the GPU path cannot raise: a sequence whose key range leaves
    # [0, Tk] reads nothing and gets NaN rows; the other sequences are unaffected.
    q, k, v, cq, ck = make_varlen([4, 3], [4, 3], 2, 1, 64, torch.float32)
    bad_ck = torch.tensor([0, 4, 1000], dtype=torch.int32)
    out = vtw_kernels.varlen_attention(q, k, v, cq, bad_ck, 4, 4, backend="triton")
    assert torch.isnan(out[4:]).all()
    good = ref_varlen64(q, k, v, cq, ck)
    assert_close(out[:4], good[:4], torch.float32, "sequence 0")


# ----------------------------------------------------------------------------------------------
# decode_attention
# ----------------------------------------------------------------------------------------------

DECODE_LENS = [70, 1, 0, 37]  # full cache, a single key, an empty row, odd


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_decode_ragged_nan_beyond_lengths(backend, dtype, group):
    hkv = 2 if group <= 2 else 1
    q, kc, vc, lens = make_cache(DECODE_LENS, hkv * group, hkv, 70, 64, dtype, seed=group)
    out = vtw_kernels.decode_attention(q, kc, vc, lens, backend=backend)
    assert_close(out, ref_decode64(q, kc, vc, lens), dtype, f"{backend} {dtype} group={group}")
    assert torch.equal(out[2], torch.zeros_like(out[2]))  # the empty row


@pytest.mark.parametrize("num_splits", [1, 2, 5])
def test_decode_triton_splits(num_splits):
    q, kc, vc, lens = make_cache([100, 3, 64], 4, 2, 100, 80, torch.float32, seed=num_splits)
    out = tri._decode_launch(q, kc, vc, lens, 0.2, num_splits=num_splits, block_n=16)
    assert_close(out, ref_decode64(q, kc, vc, lens, scale=0.2), torch.float32, f"splits={num_splits}")


def test_decode_cpu_splits_one_long_row():
    # One long row and one KV head: the CPU kernel splits the keys across threads and merges.
    q, kc, vc, lens = make_cache([1500], 4, 1, 1600, 128, torch.float32)
    out = vtw_kernels.decode_attention(q, kc, vc, lens, backend="cpu")
    assert_close(out, ref_decode64(q, kc, vc, lens), torch.float32, "cpu long row")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_decode_strided_cache(backend):
    # A cache stored [B, S_cap, Hkv, D] and viewed as [B, Hkv, S_cap, D].
    g = torch.Generator().manual_seed(9)
    kc = torch.randn(2, 40, 2, 64, generator=g).transpose(1, 2)
    vc = torch.randn(2, 40, 2, 64, generator=g).transpose(1, 2)
    q = torch.randn(2, 4, 64, generator=g)
    lens = torch.tensor([40, 17], dtype=torch.int32)
    out = vtw_kernels.decode_attention(q, kc, vc, lens, backend=backend)
    assert_close(out, ref_decode64(q, kc, vc, lens), torch.float32, backend)


def test_decode_lengths_beyond_the_cache():
    q, kc, vc, lens = make_cache([5, 9], 2, 1, 9, 64, torch.float32)
    for bad in ([5, 10], [-1, 9]):
        t = torch.tensor(bad, dtype=torch.int32)
        for backend in ("torch", "cpu"):
            with pytest.raises(ValueError, match=r"cache_seqlens\[\d\] = -?\d+ is outside \[0, S_cap = 9\]"):
                vtw_kernels.decode_attention(q, kc, vc, t, backend=backend)
        # Triton (no synchronisation): never reads past S_cap; the bad row is NaN, not truncated.
        out = vtw_kernels.decode_attention(q, kc, vc, t, backend="triton")
        bad_row = 1 if bad[1] == 10 else 0
        assert torch.isnan(out[bad_row]).all()
        good = 1 - bad_row
        assert_close(out[good], ref_decode64(q, kc, vc, lens)[good], torch.float32, "good row")


def test_decode_empty_batch():
    for backend in CPU_BACKENDS:
        q, kc, vc, lens = make_cache([], 2, 1, 5, 64, torch.float32)
        assert vtw_kernels.decode_attention(q, kc, vc, lens, backend=backend).shape == (0, 2, 64)


# ----------------------------------------------------------------------------------------------
# Bad inputs: clear errors naming the argument (Python wrappers and the C++ op itself)
# ----------------------------------------------------------------------------------------------


def _varlen_args(**over):
    q, k, v, cq, ck = make_varlen([3, 2], [3, 2], 4, 2, 64, torch.float32)
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=3, max_seqlen_k=3)
    args.update(over)
    return args


VARLEN_BAD = [
    ("hq % hkv", dict(k=torch.randn(5, 3, 64), v=torch.randn(5, 3, 64)), ValueError,
     r"number of query heads \(4\) must be a multiple of the number of KV heads \(3\)"),
    ("cu int64", dict(cu_seqlens_q=torch.tensor([0, 3, 5])), TypeError, "cu_seqlens_q must be int32, got int64"),
    ("cu_k length", dict(cu_seqlens_k=torch.tensor([0, 5], dtype=torch.int32)), ValueError,
     "cu_seqlens_k must be 1-D of length B\\+1"),
    ("head dim 72", dict(q=torch.randn(5, 4, 72), k=torch.randn(5, 2, 72), v=torch.randn(5, 2, 72)), ValueError,
     "head dim D = 72 of q is not supported; expected a multiple of 16 from 64 to 256"),
    ("head dim 32", dict(q=torch.randn(5, 4, 32), k=torch.randn(5, 2, 32), v=torch.randn(5, 2, 32)), ValueError,
     "head dim D = 32"),
    ("head dim 272", dict(q=torch.randn(5, 4, 272), k=torch.randn(5, 2, 272), v=torch.randn(5, 2, 272)), ValueError,
     "head dim D = 272"),
    ("dtype", dict(k=torch.randn(5, 2, 64, dtype=torch.float16)), TypeError, "k must have the dtype of q"),
    ("v dtype", dict(v=torch.randn(5, 2, 64, dtype=torch.bfloat16)), TypeError, "v must have the dtype of q"),
    ("rank", dict(q=torch.randn(5, 64)), ValueError, r"q must be 3-D \[T, Hq, D\]"),
    ("int q", dict(q=torch.zeros(5, 4, 64, dtype=torch.int32)), TypeError, "q must be float32, float16 or bfloat16"),
    # float64 is for the data-moving ops only (they copy bits); attention computes in float32.
    ("float64", dict(q=torch.randn(5, 4, 64, dtype=torch.float64), k=torch.randn(5, 2, 64, dtype=torch.float64),
                     v=torch.randn(5, 2, 64, dtype=torch.float64)), TypeError,
     "q must be float32, float16 or bfloat16, got (float64|Double)"),
]


@pytest.mark.parametrize("name,over,exc,msg", VARLEN_BAD, ids=[b[0] for b in VARLEN_BAD])
def test_varlen_bad_inputs(name, over, exc, msg):
    a = _varlen_args(**over)
    for backend in CPU_BACKENDS:
        with pytest.raises(exc, match=msg):
            vtw_kernels.varlen_attention(*a.values(), backend=backend)
    with pytest.raises(exc, match=msg):  # the C++ checks of the op itself
        torch.ops.vtw.varlen_attention(*a.values())


def _decode_args(**over):
    q, kc, vc, lens = make_cache([3, 2], 4, 2, 6, 64, torch.float32)
    args = dict(q=q, k_cache=kc, v_cache=vc, cache_seqlens=lens)
    args.update(over)
    return args


DECODE_BAD = [
    ("hq % hkv", dict(k_cache=torch.randn(2, 3, 6, 64), v_cache=torch.randn(2, 3, 6, 64)), ValueError,
     r"number of query heads \(4\) must be a multiple of the number of KV heads \(3\)"),
    ("lens int64", dict(cache_seqlens=torch.tensor([3, 2])), TypeError, "cache_seqlens must be int32, got int64"),
    ("lens length", dict(cache_seqlens=torch.tensor([3], dtype=torch.int32)), ValueError,
     "cache_seqlens must be 1-D of length B = 2"),
    ("batch", dict(k_cache=torch.randn(3, 2, 6, 64), v_cache=torch.randn(3, 2, 6, 64)), ValueError,
     r"k_cache must have the batch size of q \(2\)"),
    ("head dim", dict(q=torch.randn(2, 4, 48), k_cache=torch.randn(2, 2, 6, 48), v_cache=torch.randn(2, 2, 6, 48)),
     ValueError, "head dim D = 48 of q is not supported"),
    ("dtype", dict(v_cache=torch.randn(2, 2, 6, 64, dtype=torch.float16)), TypeError,
     "v_cache must have the dtype of q"),
    ("k/v shapes", dict(v_cache=torch.randn(2, 2, 5, 64)), ValueError, "k_cache and v_cache must have the same shape"),
    ("rank", dict(k_cache=torch.randn(2, 6, 64)), ValueError, r"k_cache must be 4-D \[B, Hkv, S_cap, D\]"),
]


@pytest.mark.parametrize("name,over,exc,msg", DECODE_BAD, ids=[b[0] for b in DECODE_BAD])
def test_decode_bad_inputs(name, over, exc, msg):
    a = _decode_args(**over)
    for backend in CPU_BACKENDS:
        with pytest.raises(exc, match=msg):
            vtw_kernels.decode_attention(*a.values(), backend=backend)
    with pytest.raises(exc, match=msg):
        torch.ops.vtw.decode_attention(*a.values())


# ----------------------------------------------------------------------------------------------
# opcheck and torch.compile (CPU ops)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
def test_opcheck_varlen(causal):
    q, k, v, cq, ck = make_varlen([3, 1, 5], [4, 1, 5], 4, 2, 64, torch.float32)
    torch.library.opcheck(torch.ops.vtw.varlen_attention.default, (q, k, v, cq, ck, 5, 5),
                          {"softmax_scale": 0.2, "causal": causal})


def test_opcheck_decode():
    q, kc, vc, lens = make_cache([6, 0, 2], 4, 1, 6, 64, torch.float32)
    torch.library.opcheck(torch.ops.vtw.decode_attention.default, (q, kc, vc, lens), {"softmax_scale": None})


def test_opcheck_permuted_queries():
    # A dense but permuted q: the fake kernels must promise the strides the kernels return.
    q, k, v, cq, ck = make_varlen([3, 5], [3, 5], 4, 2, 64, torch.float32)
    qp = q.transpose(0, 1).contiguous().transpose(0, 1)
    assert not qp.is_contiguous() and torch.equal(qp, q)
    torch.library.opcheck(torch.ops.vtw.varlen_attention.default, (qp, k, v, cq, ck, 5, 5))
    qd, kc, vc, lens = make_cache([6, 2], 4, 1, 6, 64, torch.float32)
    qdp = qd.transpose(0, 1).contiguous().transpose(0, 1)
    torch.library.opcheck(torch.ops.vtw.decode_attention.default, (qdp, kc, vc, lens))


def test_compile_fullgraph():
    lq, lk = [3, 6], [5, 6]
    q, k, v, cq, ck = make_varlen(lq, lk, 4, 2, 64, torch.float32)
    qd, kc, vc, lens = make_cache([6, 2], 4, 2, 6, 64, torch.float32)

    def f(q, k, v, cq, ck, qd, kc, vc, lens):
        a = torch.ops.vtw.varlen_attention(q, k, v, cq, ck, 6, 6, None, True)
        b = torch.ops.vtw.decode_attention(qd, kc, vc, lens, None)
        return a * 2.0, b + 1.0

    compiled = torch.compile(f, fullgraph=True)
    a, b = compiled(q, k, v, cq, ck, qd, kc, vc, lens)
    assert_close(a, 2.0 * ref_varlen64(q, k, v, cq, ck), torch.float32, "compiled varlen")
    assert_close(b, 1.0 + ref_decode64(qd, kc, vc, lens), torch.float32, "compiled decode")


def test_reference_backend_is_the_torch_reference():
    # The `torch` backend is reference.py; keep it honest against the float64 loop too.
    q, k, v, cq, ck = make_varlen([5, 2], [7, 2], 4, 1, 64, torch.float32)
    out = reference.varlen_attention(q, k, v, cq, ck, 5, 7)
    assert_close(out, ref_varlen64(q, k, v, cq, ck), torch.float32, "reference")


# ----------------------------------------------------------------------------------------------
# GPU (Triton on CUDA tensors, or the CUDA op when built)
# ----------------------------------------------------------------------------------------------

GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("d", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_varlen(dtype, d, causal):
    lq = [1, 7, 300, 0, 5, 129, 64]
    lk = [1, 9, 300, 4, 33, 129, 20]
    q, k, v, cq, ck = make_varlen(lq, lk, 8, 2, d, dtype, device="cuda", pad_q=3, pad_k=5)
    for backend in ("triton", None):
        out = vtw_kernels.varlen_attention(q, k, v, cq, ck, max(lq), max(lk), causal=causal, backend=backend)
        exp = ref_varlen64(q.cpu(), k.cpu(), v.cpu(), cq.cpu(), ck.cpu(), causal=causal)
        assert_close(out, exp, dtype, f"{backend} {dtype} D={d}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_gpu_decode(dtype, group):
    lens = [2000, 1, 0, 37, 513]
    q, kc, vc, t = make_cache(lens, 2 * group, 2, 2048, 128, dtype, device="cuda")
    for backend in ("triton", None):
        out = vtw_kernels.decode_attention(q, kc, vc, t, backend=backend)
        exp = ref_decode64(q.cpu(), kc.cpu(), vc.cpu(), t.cpu())
        assert_close(out, exp, dtype, f"{backend} {dtype} group={group}")


@pytest.mark.gpu
def test_gpu_decode_length_beyond_cache_is_nan():
    q, kc, vc, t = make_cache([5, 9], 2, 1, 9, 64, torch.float16, device="cuda")
    t[1] = 10
    out = vtw_kernels.decode_attention(q, kc, vc, t, backend="triton")
    assert torch.isnan(out[1]).all() and torch.isfinite(out[0]).all()


@pytest.mark.gpu
def test_gpu_compile():
    lq = [3, 6]
    q, k, v, cq, ck = make_varlen(lq, lq, 4, 2, 64, torch.float16, device="cuda")
    f = torch.compile(lambda q, k, v, a, b: torch.ops.vtw.varlen_attention(q, k, v, a, b, 6, 6, None, True),
                      fullgraph=True)
    assert_close(f(q, k, v, cq, ck), ref_varlen64(q.cpu(), k.cpu(), v.cpu(), cq.cpu(), ck.cpu()), torch.float16)


# ----------------------------------------------------------------------------------------------
# Ahead-of-time GPU compilation (no GPU needed): every configuration the launchers pick
# (tri.varlen_config, tri.decode_config, tri.reduce_config) compiles for sm_90a, and ptxas reports
# no register spills for any of them.
# ----------------------------------------------------------------------------------------------

_AOT_SCRIPT = r"""
import json, os, re, subprocess, sys, tempfile
import torch
from vtw_kernels.compat import triton as ct
from vtw_kernels.triton import attention as tri

ptxas = ct.ptxas(90)  # the assembler Triton itself uses for sm_90 (its choice differs by version)
if ptxas is None:
    print("NOPTXAS"); sys.exit(0)
TY = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK_DS = (64, 128, 256)  # every supported head dim pads to one of these
PADDED = {64: 64, 128: 80, 256: 144}  # the smallest head dim padded to each


def report(kernel_name, config, kernel, sig, cst, warps, stages):
    compiled = ct.aot_compile(kernel, sig, cst, num_warps=warps, num_stages=stages)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    rep = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                         capture_output=True, text=True, check=True).stderr
    os.unlink(f.name)
    print(json.dumps(dict(kernel=kernel_name, config=config,
                          registers=int(re.findall(r"Used (\d+) registers", rep)[0]),
                          spill=int(re.findall(r"(\d+) bytes spill stores", rep)[0]))), flush=True)


def varlen():
    for dtype in DTYPES:
        t = "*" + TY[dtype]
        sig = {"Q": t, "K": t, "V": t, "O": t, "CU_Q": "*i32", "CU_K": "*i32", "Tq": "i32", "Tk": "i32",
               "qk_scale": "fp32", **{n: "i32" for n in ("stride_qt", "stride_qh", "stride_kt", "stride_kh",
                                                       "stride_vt", "stride_vh", "stride_ot", "stride_oh")}}
        for block_d in BLOCK_DS:
            bm, bn, warps, stages = tri.varlen_config(dtype, block_d)
            for causal in (True, False):  # a full head dim, then a padded one (masked lanes)
                d = block_d if causal else PADDED[block_d]
                cst = dict(GROUP=4, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal,
                           PRECISION=tri._precision(dtype), OFFS_64=False)
                report("varlen", f"{TY[dtype]} D={d} causal={causal} {bm}x{bn} warps={warps} "
                       f"stages={stages}", tri._varlen_fwd_kernel, sig, cst, warps, stages)


def decode():
    for dtype in DTYPES:
        t = "*" + TY[dtype]
        sig = {"Q": t, "K": t, "V": t, "LENS": "*i32", "O": t, "M_PART": "*fp32", "L_PART": "*fp32",
               "ACC_PART": "*fp32", "S_cap": "i32", "chunk": "i32", "qk_scale": "fp32",
               **{n: "i32" for n in ("stride_qb", "stride_qh", "stride_kb", "stride_kh", "stride_ks",
                                     "stride_vb", "stride_vh", "stride_vs", "stride_ob", "stride_oh")}}
        for block_d in BLOCK_DS:
            bn, warps, stages = tri.decode_config(dtype, block_d)
            for splits in (1, 8):
                d = block_d if splits == 1 else PADDED[block_d]
                cst = dict(GROUP=4, BLOCK_G=16, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_N=bn, NUM_SPLITS=splits,
                           PRECISION=tri._precision(dtype), OFFS_64=False)
                report("decode", f"{TY[dtype]} D={d} splits={splits} BLOCK_N={bn} warps={warps} "
                       f"stages={stages}", tri._decode_split_kernel, sig, cst, warps, stages)
    sig = {"LENS": "*i32", "O": "*bf16", "M_PART": "*fp32", "L_PART": "*fp32", "ACC_PART": "*fp32",
           "S_cap": "i32", "stride_ob": "i32", "stride_oh": "i32"}
    for block_d in BLOCK_DS:
        block_s, block_c, warps = tri.reduce_config(block_d, 128)  # 128 splits: the launcher's maximum
        cst = dict(HEAD_DIM=block_d, BLOCK_D=block_d, NUM_SPLITS=128, BLOCK_S=block_s, BLOCK_C=block_c)
        report("merge", f"BLOCK_D={block_d} splits=128 BLOCK_C={block_c} warps={warps}", tri._decode_reduce_kernel,
               sig, cst, warps, 1)


{"varlen": varlen, "decode": decode}[sys.argv[1]]()
print("OK")
"""


def test_gpu_kernels_compile_for_sm90_without_spills(tmp_path):
    """Compiles every launcher configuration ahead of time for Hopper, in fresh processes
    without TRITON_INTERPRET and with empty Triton caches of their own (so the result never
    depends on ~/.triton), and asks ptxas for registers and spills. Two processes, one per
    group of kernels, run side by side."""
    import json

    from _refs import run_triton_aot

    procs = [run_triton_aot(_AOT_SCRIPT, tmp_path, part) for part in ("varlen", "decode")]
    rows = []
    for proc in procs:
        out, err = proc.communicate(timeout=1800)
        if out.startswith("NOPTXAS"):
            pytest.skip("Triton has no ptxas for sm_90 here")
        assert proc.returncode == 0 and out.rstrip().endswith("OK"), out[-2000:] + err[-4000:]
        rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    table = "\n".join(f"{r['kernel']:7} {r['config']:55} {r['registers']:4} registers {r['spill']:5} bytes spilled"
                      for r in rows)
    print(table)
    assert len(rows) == 18 + 18 + 3, table
    assert all(r["spill"] == 0 for r in rows), "register spills on sm_90a:\n" + table
