"""CUDA withdraw and compact_kv_: registration (everywhere) and behaviour on a GPU.

The first tests run on any machine: whenever vtw_kernels._C was built with CUDA (CI has nvcc,
so CI's build has), both ops must have their C++ kernel on the CUDA dispatch key. The rest
are marked `gpu` (skipped at collection without a CUDA device; bench/gpu_check.sh runs them,
and compute-sanitizer over the tests selected by -k "small and not torch"). They compare the CUDA
kernels, the Triton kernels and the torch reference on the device, bit for bit, against an
independent per-row gather written here.
"""

from __future__ import annotations

import pytest
import torch

import vtw_kernels
from vtw_kernels import _ext, reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
INT_OF = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
          torch.float64: torch.int64}
OPS = ("withdraw", "compact_kv_")
DTYPE_IDS = ["float32", "float16", "bfloat16", "float64"]  # ids without "torch": -k "not torch" picks backends


# --------------------------------------------------------------------- registration, no GPU

@pytest.mark.parametrize("op", OPS)
def test_cuda_dispatch_key_has_the_cpp_kernel_whenever_built_with_cuda(op):
    if not _ext.HAS_C:
        pytest.skip(f"vtw_kernels._C is not built: {_ext.build_hint()}")
    if not vtw_kernels.WITH_CUDA:
        pytest.skip("vtw_kernels._C was built without CUDA (no nvcc or a CPU build of torch)")
    assert _ext.has_kernel(op, "CUDA"), f"vtw::{op} has no CUDA kernel although _C was built with CUDA"
    assert op not in _ext.TRITON_ON_CUDA_KEY, f"Triton was registered over the CUDA kernel of vtw::{op}"
    assert vtw_kernels.available_backends(op)[0] == "cuda"


def test_triton_on_the_cuda_key_is_not_listed_as_the_cuda_backend(monkeypatch):
    """Without compiled CUDA kernels, _registrations puts Triton on the CUDA key; the "cuda"
    backend must then not be offered (it would silently run Triton)."""
    if not _ext.HAS_C:
        pytest.skip("vtw_kernels._C is not built")
    monkeypatch.setattr(_ext, "TRITON_ON_CUDA_KEY", {"withdraw"})
    monkeypatch.setattr(_ext, "has_kernel", lambda op, key: True)
    assert "cuda" not in vtw_kernels.available_backends("withdraw")
    assert "cuda" in vtw_kernels.available_backends("compact_kv_")


# --------------------------------------------------------------------------------- helpers

def random_bits(shape, dtype, gen=None):
    it = INT_OF[dtype]
    info = torch.iinfo(it)
    return torch.randint(info.min, info.max, shape, dtype=it, device="cuda", generator=gen).view(dtype)


def bits(t):
    return t.view(INT_OF[t.dtype]) if t.dtype in INT_OF else t


def assert_bits_equal(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    assert torch.equal(bits(a), bits(b))


def gather_expected(hidden, mask, s_keep, pad_left):
    """Per-row boolean gather: an implementation independent of every backend."""
    B, S, D = hidden.shape
    out = torch.zeros(B, s_keep, D, dtype=hidden.dtype, device=hidden.device)
    idx = torch.full((B, s_keep), -1, dtype=torch.long, device=hidden.device)
    lens = (~mask).sum(1).to(torch.int32)
    positions = torch.arange(S, device=hidden.device)
    for b in range(B):
        n = int(lens[b])
        first = s_keep - n if pad_left else 0
        out[b, first:first + n] = hidden[b][~mask[b]]
        idx[b, first:first + n] = positions[~mask[b]]
    return out, idx, lens


def llava_mask(B, S, gen, visual=(35, 576)):
    """A system prompt, an image span and text, with the image moved a little per row, and a
    few random visual tokens sprinkled in the text."""
    mask = torch.zeros(B, S, dtype=torch.bool)
    for b in range(B):
        start = min(visual[0] + 3 * b, max(S - visual[1], 0))
        mask[b, start:start + visual[1]] = True
    mask |= torch.rand(B, S, generator=gen) < 0.05
    return mask.cuda()


def run_withdraw(backend, hidden, mask, num_keep, pad_left):
    if backend == "triton":
        from vtw_kernels.triton import data

        return data.withdraw(hidden, mask, num_keep, pad_left)
    if backend == "torch":
        return reference.withdraw(hidden, mask, num_keep, pad_left)
    return torch.ops.vtw.withdraw(hidden, mask, num_keep, pad_left)


BACKENDS = ["cuda", "triton", "torch"]


# ------------------------------------------------------------------------------ withdraw

@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("pad_left", [False, True])
@pytest.mark.parametrize("shape", [(1, 671, 4096), (3, 67, 100), (2, 300, 33)],
                         ids=["llava_b1", "small_d100", "odd_d33"])
def test_withdraw_agrees(backend, dtype, pad_left, shape):
    gen = torch.Generator().manual_seed(0)
    B, S, D = shape
    hidden = random_bits(shape, dtype)
    mask = llava_mask(B, S, gen, visual=(5, S // 2))
    mask[0, :3] = False
    if B > 1:
        mask[1] = True  # a row of visual tokens only
    s_max = int((~mask).sum(1).max())
    for num_keep in (None, s_max, s_max + 5):
        out, idx, lens = run_withdraw(backend, hidden, mask, num_keep, pad_left)
        e_out, e_idx, e_lens = gather_expected(hidden, mask, s_max if num_keep is None else num_keep, pad_left)
        assert_bits_equal(out, e_out)
        assert torch.equal(idx, e_idx) and torch.equal(lens, e_lens)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_withdraw_small_strided_and_unaligned(backend, dtype):
    """Hidden with non-contiguous batch and token strides and an odd start in the last dim
    (narrow vector accesses), and a transposed mask."""
    gen = torch.Generator().manual_seed(1)
    big = random_bits((3, 90, 41), dtype)
    hidden = big[:, 1::2, 1:38]
    mask = llava_mask(45, 3, gen, visual=(0, 1)).t()
    for pad_left in (False, True):
        for num_keep in (None, 45):
            out, idx, lens = run_withdraw(backend, hidden, mask, num_keep, pad_left)
            s_keep = int((~mask).sum(1).max()) if num_keep is None else num_keep
            e_out, e_idx, e_lens = gather_expected(hidden, mask, s_keep, pad_left)
            assert_bits_equal(out, e_out)
            assert torch.equal(idx, e_idx) and torch.equal(lens, e_lens)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_withdraw_small_edge_shapes(backend):
    h = random_bits((0, 5, 8), torch.float16)
    out, idx, lens = run_withdraw(backend, h, torch.zeros(0, 5, dtype=torch.bool, device="cuda"), None, False)
    assert out.shape == (0, 0, 8) and idx.shape == (0, 0) and lens.shape == (0,)
    h = random_bits((2, 0, 8), torch.float16)
    out, idx, lens = run_withdraw(backend, h, torch.zeros(2, 0, dtype=torch.bool, device="cuda"), 3, True)
    assert torch.equal(bits(out), torch.zeros(2, 3, 8, dtype=torch.int16, device="cuda"))
    assert (idx == -1).all() and lens.tolist() == [0, 0]
    h = random_bits((2, 6, 0), torch.bfloat16)
    mask = torch.tensor([[1, 0, 0, 1, 0, 1], [1] * 6], dtype=torch.bool, device="cuda")
    out, idx, lens = run_withdraw(backend, h, mask, None, False)
    assert out.shape == (2, 3, 0) and idx.tolist() == [[1, 2, 4], [-1, -1, -1]] and lens.tolist() == [3, 0]
    out, idx, lens = run_withdraw(backend, random_bits((2, 6, 4), torch.float32), torch.ones_like(mask), 0, False)
    assert out.shape == (2, 0, 4) and lens.tolist() == [0, 0]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("pad_left", [False, True])
def test_withdraw_num_keep_too_small_is_reported_never_truncated(backend, dtype, pad_left):
    B, S, D = 3, 200, 64
    hidden = random_bits((B, S, D), dtype)
    mask = torch.ones(B, S, dtype=torch.bool, device="cuda")
    mask[0, :10] = False  # keeps 10
    mask[1, 50:150] = False  # keeps 100 > num_keep
    mask[2, 190:] = False  # keeps 10
    num_keep = 40
    out, idx, lens = run_withdraw(backend, hidden, mask, num_keep, pad_left)
    torch.cuda.synchronize()  # a write out of bounds would surface here (or under compute-sanitizer)
    assert lens.tolist() == [10, 100, 10]
    assert (idx[1] == -1).all() and torch.isnan(out[1].float()).all()
    e_out, e_idx, _ = gather_expected(hidden[[0, 2]], mask[[0, 2]], num_keep, pad_left)
    assert_bits_equal(out[[0, 2]], e_out)
    assert torch.equal(idx[[0, 2]], e_idx)
    with pytest.raises(ValueError, match=r"num_keep = 40 but row 1 keeps 100 tokens"):
        vtw_kernels.Withdrawn(out, idx, lens).check()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_withdraw_hidden_above_2_31_elements(backend):
    """Offsets past 2^31 elements: hidden [1, 2^31/4096 + 8, 4096] float16 (4.3 GB), keeping
    tokens at the start, around element 2^31, and at the end."""
    S = 2**31 // 4096 + 8
    hidden = torch.empty(1, S, 4096, dtype=torch.float16, device="cuda")
    bits(hidden).view(-1)[:] = 0x1234
    keep = [0, 1, 2, S // 2, 2**31 // 4096 - 1, 2**31 // 4096, 2**31 // 4096 + 1] + list(range(S - 5, S))
    for i, s in enumerate(keep):
        bits(hidden)[0, s] = torch.arange(4096, dtype=torch.int16, device="cuda") * 7 + i
    mask = torch.ones(1, S, dtype=torch.bool, device="cuda")
    mask[0, keep] = False
    expected = hidden[0, keep].clone()
    for num_keep, pad_left in ((None, False), (len(keep) + 3, True)):
        out, idx, lens = run_withdraw(backend, hidden, mask, num_keep, pad_left)
        first = 3 if pad_left else 0
        assert lens.tolist() == [len(keep)]
        assert idx[0, first:first + len(keep)].tolist() == keep
        assert_bits_equal(out[0, first:first + len(keep)], expected)
        if pad_left:
            assert (bits(out[0, :first]) == 0).all() and (idx[0, :first] == -1).all()
    del hidden
    torch.cuda.empty_cache()


@pytest.mark.gpu
def test_withdraw_torch_compile_with_num_keep():
    gen = torch.Generator().manual_seed(2)
    hidden = random_bits((4, 120, 256), torch.bfloat16)
    mask = llava_mask(4, 120, gen, visual=(10, 80))
    num_keep = int((~mask).sum(1).max()) + 2

    def f(h, m):
        out, idx, lens = torch.ops.vtw.withdraw(h, m, num_keep, True)
        return out, idx + 1, lens

    compiled = torch.compile(f, fullgraph=True)
    for _ in range(2):
        got = compiled(hidden, mask)
        want = f(hidden, mask)
        assert_bits_equal(got[0], want[0])
        assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    # The typed wrapper under torch.compile (graph breaks allowed).
    wrapped = torch.compile(lambda h, m: vtw_kernels.withdraw(h, m, num_keep=num_keep).out)
    assert_bits_equal(wrapped(hidden, mask), gather_expected(hidden, mask, num_keep, False)[0])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_withdraw_cuda_graph_capture_with_num_keep(backend):
    gen = torch.Generator().manual_seed(3)
    B, S, D = 3, 150, 128
    static_h = random_bits((B, S, D), torch.float16)
    static_m = llava_mask(B, S, gen, visual=(5, 100))
    num_keep = S - 90
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (Triton compiles here, not during capture)
        for _ in range(2):
            run_withdraw(backend, static_h, static_m, num_keep, False)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, idx, lens = run_withdraw(backend, static_h, static_m, num_keep, False)
    for seed in (4, 5):
        g = torch.Generator().manual_seed(seed)
        static_h.copy_(random_bits((B, S, D), torch.float16))
        static_m.copy_(llava_mask(B, S, g, visual=(seed, 100)))
        graph.replay()
        e_out, e_idx, e_lens = gather_expected(static_h, static_m, num_keep, False)
        assert_bits_equal(out, e_out)
        assert torch.equal(idx, e_idx) and torch.equal(lens, e_lens)


@pytest.mark.gpu
def test_withdraw_opcheck():
    gen = torch.Generator().manual_seed(6)
    hidden = torch.randn(3, 40, 64, device="cuda", dtype=torch.float16, requires_grad=True)
    mask = llava_mask(3, 40, gen, visual=(3, 20))
    torch.library.opcheck(torch.ops.vtw.withdraw.default, (hidden, mask, 30, False))
    torch.library.opcheck(torch.ops.vtw.withdraw.default, (hidden, mask, None, True))


# ----------------------------------------------------------------------------- compact_kv_

def make_caches(layers, B, H, S_cap, kspec, vspec, offset=0):
    """Keys and values as views into larger buffers (writes outside the views would show);
    kspec/vspec = (dtype, Dh). offset=1 starts the views one element in (narrow accesses)."""
    bufs, keys, values = [], [], []
    for lst, (dtype, dh) in ((keys, kspec), (values, vspec)):
        for _ in range(layers):
            buf = random_bits((B, H, S_cap + 2, dh + 2 * offset), dtype)
            bufs.append(buf)
            lst.append(buf[:, :, :S_cap, offset:offset + dh])
    return bufs, keys, values


def run_compact(backend, keys, values, mask):
    if backend == "triton":
        from vtw_kernels.triton import data

        return data.compact_kv_(keys, values, mask)
    if backend == "torch":
        return reference.compact_kv_(keys, values, mask)
    return torch.ops.vtw.compact_kv_(keys, values, mask)


def check_compact(backend, bufs, keys, values, mask):
    S = mask.shape[1]
    tensors = keys + values
    before = [b.clone() for b in bufs]
    expected = [[t[b][:, :S][:, ~mask[b]].clone() for b in range(mask.shape[0])] for t in tensors]
    new_lens = run_compact(backend, keys, values, mask)
    assert torch.equal(new_lens, (~mask).sum(1).to(torch.int32))
    for t, exp in zip(tensors, expected):
        for b, rows in enumerate(exp):
            assert_bits_equal(t[b, :, :rows.shape[1]], rows)
    for buf, old, t in zip(bufs, before, tensors):
        region = torch.zeros(buf.shape, dtype=torch.bool, device="cuda")
        region.as_strided(t.shape, t.stride(), t.storage_offset() - buf.storage_offset())[:, :, :S] = True
        assert torch.equal(bits(buf)[~region], bits(old)[~region])  # nothing else touched, >= S included


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_compact_kv_32_layers_agree(backend, dtype):
    gen = torch.Generator().manual_seed(7)
    B, H, S, S_cap = 2, 8, 671, 700
    bufs, keys, values = make_caches(32, B, H, S_cap, (dtype, 128), (dtype, 128))
    check_compact(backend, bufs, keys, values, llava_mask(B, S, gen))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_compact_kv_small_mixed_dtypes_unaligned(backend):
    gen = torch.Generator().manual_seed(8)
    B, H, S, S_cap = 3, 2, 90, 96
    bufs, keys, values = make_caches(2, B, H, S_cap, (torch.bfloat16, 24), (torch.float32, 7), offset=1)
    mask = llava_mask(B, S, gen, visual=(4, 50))
    mask[1] = False
    if B > 2:
        mask[2] = True
    check_compact(backend, bufs, keys, values, mask)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_compact_kv_small_many_layers_device_table(backend):
    """41 layers: 82 tensors, more than the CUDA kernel passes as a parameter (80)."""
    gen = torch.Generator().manual_seed(9)
    B, H, S = 2, 2, 70
    bufs, keys, values = make_caches(41, B, H, S, (torch.float16, 64), (torch.float16, 32))
    check_compact(backend, bufs, keys, values, llava_mask(B, S, gen, visual=(6, 40)))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_compact_kv_small_edge_shapes(backend):
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool, device="cuda")
    assert run_compact(backend, [], [], mask).tolist() == [2, 0]
    k = random_bits((0, 2, 4, 8), torch.float16)
    assert run_compact(backend, [k], [k.clone()], mask[:0]).shape == (0,)
    k, v = random_bits((2, 2, 4, 0), torch.float16), random_bits((2, 2, 4, 0), torch.float16)
    assert run_compact(backend, [k], [v], mask).tolist() == [2, 0]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_compact_kv_cache_above_2_31_elements(backend):
    S = 2**31 // 128 + 64
    k = torch.empty(1, 1, S, 128, dtype=torch.bfloat16, device="cuda")
    bits(k).view(-1)[:] = 0x0101
    tail = random_bits((16, 128), torch.bfloat16)
    k[0, 0, S - 16:] = tail
    v = random_bits((1, 1, S, 2), torch.float32)
    v_tail = v[0, 0, S - 16:].clone()
    mask = torch.ones(1, S, dtype=torch.bool, device="cuda")
    mask[0, :4] = False
    mask[0, S - 16:] = False
    head = k[0, 0, :4].clone()
    assert run_compact(backend, [k], [v], mask).tolist() == [20]
    assert_bits_equal(k[0, 0, :4], head)
    assert_bits_equal(k[0, 0, 4:20], tail)
    assert_bits_equal(v[0, 0, 4:20], v_tail)
    del k, v
    torch.cuda.empty_cache()


@pytest.mark.gpu
def test_compact_kv_cuda_graph_capture():
    """The CUDA kernel passes up to 80 tensors as a kernel parameter: capturable."""
    gen = torch.Generator().manual_seed(10)
    B, H, S = 2, 4, 64
    bufs, keys, values = make_caches(4, B, H, S, (torch.bfloat16, 64), (torch.bfloat16, 64))
    mask = llava_mask(B, S, gen, visual=(4, 30))
    torch.ops.vtw.compact_kv_(keys, values, mask)  # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        new_lens = torch.ops.vtw.compact_kv_(keys, values, mask)
    for buf in bufs:
        buf.copy_(random_bits(buf.shape, buf.dtype))
    expected = [[t[b][:, ~mask[b]].clone() for b in range(B)] for t in keys + values]
    graph.replay()
    assert torch.equal(new_lens, (~mask).sum(1).to(torch.int32))
    for t, exp in zip(keys + values, expected):
        for b, rows in enumerate(exp):
            assert_bits_equal(t[b, :, :rows.shape[1]], rows)


@pytest.mark.gpu
def test_compact_kv_opcheck():
    gen = torch.Generator().manual_seed(11)
    _, keys, values = make_caches(2, 2, 2, 20, (torch.float16, 16), (torch.float32, 8))
    mask = llava_mask(2, 18, gen, visual=(2, 8))
    torch.library.opcheck(torch.ops.vtw.compact_kv_.default, (keys, values, mask))
