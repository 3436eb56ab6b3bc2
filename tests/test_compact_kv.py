"""compact_kv_ on the "torch" and "cpu" backends (Triton and CUDA have their own files).

Every cache tensor of a case is a view into one byte buffer filled with random bit patterns,
with guard bytes between the tensors. After the call, every byte of that buffer is checked
against the loop reference of tests/_refs.py: the first new_lens[b] slots of every
tensor/row/head hold the kept tokens in order, bit for bit; positions >= S, other rows, heads,
layers and the bytes around the views are untouched. Only slots new_lens[b] .. S-1 are free.
"""

from __future__ import annotations

import pytest
import torch

import vtw_kernels
from vtw_kernels.compat import torch as _torch_compat
from _refs import FLOAT_DTYPES, Caches, backends, bits, check_compaction, make_mask, random_bits, ref_new_lens

BACKENDS = backends("compact_kv_")
DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in FLOAT_DTYPES]


def test_backends_under_test():
    assert "torch" in BACKENDS
    assert "cpu" in BACKENDS, vtw_kernels.build_hint()


CASES = [
    # (B, H, S, S_cap, layers, key Dh, value Dh, layout, mask kind)
    pytest.param(5, 3, 123, 123, 1, 16, 16, "contiguous", "random", id="5x3x123x16"),
    pytest.param(3, 2, 40, 47, 3, 8, 12, "slice", "span", id="3_layers_Scap>S_slice_Dk!=Dv"),
    pytest.param(4, 3, 21, 25, 2, 6, 4, "bshd", "mixed_rows", id="bshd_layout"),
    pytest.param(3, 2, 17, 20, 2, 5, 5, "every_other", "strided", id="strided_batch_heads_and_mask"),
    pytest.param(3, 2, 9, 12, 1, 4, 4, "slice", "all_visual", id="all_visual"),
    pytest.param(3, 2, 9, 12, 1, 4, 4, "slice", "no_visual", id="no_visual"),
    pytest.param(1, 1, 1, 1, 1, 1, 1, "contiguous", "no_visual", id="single_token_kept"),
    pytest.param(1, 1, 1, 3, 1, 2, 3, "contiguous", "all_visual", id="single_token_withdrawn"),
    pytest.param(0, 2, 6, 8, 2, 4, 4, "contiguous", "random", id="B0"),
    pytest.param(3, 2, 0, 5, 2, 4, 4, "slice", "random", id="S0"),
    pytest.param(3, 2, 7, 9, 1, 0, 3, "contiguous", "random", id="keys_Dh0"),
    pytest.param(3, 0, 7, 9, 1, 4, 4, "contiguous", "random", id="H0"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,S,S_cap,L,Dk,Dv,layout,kind", CASES)
def test_matches_reference(backend, dtype, B, H, S, S_cap, L, Dk, Dv, layout, kind):
    g = torch.Generator().manual_seed(B * 100 + S)
    caches = Caches(B, H, S_cap, [(dtype, Dk, layout)] * L, [(dtype, Dv, layout)] * L, seed=S_cap)
    mask = make_mask(kind, B, S, g)
    before = caches.buf.clone()
    keys, values = caches.split(caches.buf)
    new_lens = vtw_kernels.compact_kv_(keys, values, mask, backend=backend)
    check_compaction(caches.buf, before, caches.views, mask, new_lens, f"{backend} {kind} {layout}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_across_layers(backend):
    # The contract lets every tensor be float32, float16 or bfloat16 on its own.
    g = torch.Generator().manual_seed(1)
    specs_k = [(torch.float16, 8, "contiguous"), (torch.float32, 3, "slice"), (torch.bfloat16, 5, "bshd")]
    specs_v = [(torch.bfloat16, 6, "slice"), (torch.float16, 8, "every_other"), (torch.float32, 2, "contiguous")]
    caches = Caches(4, 3, 30, specs_k, specs_v, seed=2)
    mask = torch.rand(4, 26, generator=g) < 0.5
    before = caches.buf.clone()
    keys, values = caches.split(caches.buf)
    new_lens = vtw_kernels.compact_kv_(keys, values, mask, backend=backend)
    check_compaction(caches.buf, before, caches.views, mask, new_lens, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_single_tensor_instead_of_list(backend, dtype):
    g = torch.Generator().manual_seed(2)
    caches = Caches(3, 2, 15, [(dtype, 6, "slice")], [(dtype, 7, "bshd")], seed=3)
    mask = torch.rand(3, 11, generator=g) < 0.5
    before = caches.buf.clone()
    (k,), (v,) = caches.split(caches.buf)
    new_lens = vtw_kernels.compact_kv_(k, v, mask, backend=backend)
    check_compaction(caches.buf, before, caches.views, mask, new_lens, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_layers(backend):
    mask = torch.tensor([[True, False, False], [True, True, True]])
    new_lens = vtw_kernels.compact_kv_([], [], mask, backend=backend)
    assert new_lens.dtype == torch.int32 and torch.equal(new_lens, torch.tensor([2, 0], dtype=torch.int32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_keys_and_values_halves_of_one_tensor(backend):
    # A fused KV cache [2, B, H, S_cap, Dh]: keys = kv[0], values = kv[1] are distinct tensors.
    g = torch.Generator().manual_seed(4)
    kv = random_bits((2, 3, 2, 12, 4), torch.bfloat16, g)
    mask = torch.rand(3, 10, generator=g) < 0.5
    before = kv.clone()
    new_lens = vtw_kernels.compact_kv_(kv[0], kv[1], mask, backend=backend)
    check_compaction(kv, before, lambda t: [t[0], t[1]], mask, new_lens, backend)


@pytest.mark.parametrize("dtype", DTYPES)
def test_default_backend_and_raw_op(dtype):
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(3, 14, generator=g) < 0.5
    for call in ("default", "raw", "overload"):
        caches = Caches(3, 2, 16, [(dtype, 4, "slice")] * 2, [(dtype, 6, "contiguous")] * 2, seed=6)
        before = caches.buf.clone()
        keys, values = caches.split(caches.buf)
        if call == "default":
            new_lens = vtw_kernels.compact_kv_(keys, values, mask)
        elif call == "raw":
            new_lens = torch.ops.vtw.compact_kv_(keys, values, mask)
        else:
            new_lens = torch.ops.vtw.compact_kv_.default(keys, values, mask)
        check_compaction(caches.buf, before, caches.views, mask, new_lens, call)


# ----------------------------------------------------------------------------------------------
# opcheck and torch.compile of torch.ops.vtw.compact_kv_ (CPU tensors)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layers,S_cap", [(1, 9), (2, 12)])
def test_opcheck(layers, S_cap):
    g = torch.Generator().manual_seed(7)
    keys = [torch.randn(2, 3, S_cap, 4, generator=g) for _ in range(layers)]
    values = [torch.randn(2, 3, S_cap + 2, 6, generator=g)[:, :, :S_cap] for _ in range(layers)]
    mask = torch.rand(2, 9, generator=g) < 0.5
    torch.library.opcheck(torch.ops.vtw.compact_kv_.default, (keys, values, mask))


def _compact_and_use(k0, k1, v0, v1, mask):
    new_lens = torch.ops.vtw.compact_kv_([k0, k1], [v0, v1], mask)
    return new_lens + 1


@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_compile_fullgraph(backend):
    # Four separate cache tensors (windows of larger caches, BSHD layout, S_cap > S). The second
    # call has other shapes, so Dynamo recompiles it with dynamic shapes.
    torch._dynamo.reset()
    compiled = torch.compile(_compact_and_use, fullgraph=True, backend=backend)
    g = torch.Generator().manual_seed(8)
    for B, S, S_cap in ((3, 10, 13), (2, 6, 9)):
        specs = [(torch.float32, 4, "slice"), (torch.bfloat16, 4, "contiguous"), (torch.float16, 5, "bshd"),
                 (torch.float16, 3, "slice")]
        caches = [Caches(B, 2, S_cap, [spec], [], seed=S + i) for i, spec in enumerate(specs)]
        mask = torch.rand(B, S, generator=g) < 0.5
        befores = [c.buf.clone() for c in caches]
        new_lens = compiled(*[c.views(c.buf)[0] for c in caches], mask) - 1
        for c, before in zip(caches, befores):
            check_compaction(c.buf, before, c.views, mask, new_lens, f"compiled {backend} B={B}")


# PyTorch 2.14.1 (inductor, dynamic shapes) drops the storage offset of a view that a custom op
# mutates when another mutated argument is a view of the same base: both writes land on the
# view at offset 0. Pure-PyTorch repro, no vtw code involved:
#     @torch.library.custom_op("mylib::bump_", mutates_args=("x", "y"))
#     def bump_(x: torch.Tensor, y: torch.Tensor) -> None: x.add_(1); y.add_(10)
#     kv = torch.zeros(2, 5, 3)
#     torch.compile(lambda kv: bump_(kv[0], kv[1]), dynamic=True)(kv)   # kv[0] = 11, kv[1] = 0
# With static shapes, with aot_eager, and with distinct cache tensors it is right (tests above).
UPSTREAM_ALIAS_BUG = pytest.mark.xfail(strict=True, reason=(
    "PyTorch inductor bug with dynamic shapes: a mutated view of a base shared with another "
    "mutated argument loses its storage offset (see the comment above)"))


@pytest.mark.parametrize("dynamic", [False, pytest.param(True, marks=UPSTREAM_ALIAS_BUG)],
                         ids=["static", "dynamic"])
def test_compile_fullgraph_views_of_one_buffer(dynamic):
    # A fused cache [2, B, H, S_cap, Dh] is the graph input; keys and values are its halves.
    torch._dynamo.reset()

    def fn(kv, mask):
        return torch.ops.vtw.compact_kv_([kv[0]], [kv[1]], mask)

    compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic)
    g = torch.Generator().manual_seed(9)
    kv = random_bits((2, 3, 2, 12, 4), torch.float16, g)
    mask = torch.rand(3, 10, generator=g) < 0.5
    before = kv.clone()
    new_lens = compiled(kv, mask)
    check_compaction(kv, before, lambda t: [t[0], t[1]], mask, new_lens, "compiled")


# Several graph inputs that are views of one buffer, mutated by a custom op: inductor gets this
# wrong on some releases only (vtw_kernels.compat.torch, bugs (b) and (c)). Pure-PyTorch repro:
#     def f(a, b): bump_(a, b); return a.sum() + b.sum()
#     buf = torch.zeros(2, 5, 3); torch.compile(f, fullgraph=True, dynamic=D)(buf[0], buf[1])
# torch 2.11, D=False: buf[1] holds garbage after the call; 2.13 / 2.14 right (D=True: the reverse,
# as in this test).
UPSTREAM_ALIASED_INPUTS_BUG = pytest.mark.xfail(strict=True, reason=(
    "PyTorch inductor bug on this torch release: a custom op mutating several graph inputs that are "
    "views of one buffer (see vtw_kernels/compat/torch.py)"))


@pytest.mark.parametrize("dynamic", [
    pytest.param(d, marks=() if _torch_compat.INDUCTOR_ALIASED_INPUTS_OK[d] else UPSTREAM_ALIASED_INPUTS_BUG)
    for d in (False, True)], ids=["static", "dynamic"])
def test_compile_fullgraph_aliased_graph_inputs(dynamic):
    # Every cache tensor is a separate graph input, all of them views of one byte buffer.
    torch._dynamo.reset()
    compiled = torch.compile(_compact_and_use, fullgraph=True, dynamic=dynamic)
    g = torch.Generator().manual_seed(10)
    caches = Caches(3, 2, 13, [(torch.float32, 4, "slice")] * 2, [(torch.float16, 5, "bshd")] * 2, seed=1)
    mask = torch.rand(3, 10, generator=g) < 0.5
    before = caches.buf.clone()
    (k0, k1), (v0, v1) = caches.split(caches.buf)
    new_lens = compiled(k0, k1, v0, v1, mask) - 1
    check_compaction(caches.buf, before, caches.views, mask, new_lens, "compiled")


def test_compile_fullgraph_of_the_python_wrapper():
    torch._dynamo.reset()
    compiled = torch.compile(lambda k, v, m: vtw_kernels.compact_kv_(k, v, m), fullgraph=True, backend="eager")
    k, v = torch.randn(2, 1, 5, 3), torch.randn(2, 1, 5, 3)
    mask = torch.rand(2, 5) < 0.5
    assert torch.equal(compiled(k, v, mask), ref_new_lens(mask))


# ----------------------------------------------------------------------------------------------
# Memory overlap between (and within) the cache tensors of one call: refused on every backend
# (torch reference, C++ CPU, Triton under the interpreter, the raw op, the fake kernel) before
# anything is written; views of one buffer that share no byte are accepted and compacted.
# ----------------------------------------------------------------------------------------------

def _overlap_callers():
    import vtw_kernels as vk

    out = [b for b in vk.available_backends("compact_kv_") if b in ("torch", "cpu", "triton")]
    return out + ["raw"]


OVERLAP_CALLERS = _overlap_callers()


def _buf(*shape, dtype=torch.float16, seed=0):
    return random_bits(shape, dtype, torch.Generator().manual_seed(seed))


def _as(buf, size, stride, offset=0):
    return buf.as_strided(size, stride, offset)


# (id, maker of (keys, values), the error's pattern)
OVERLAPPING = [
    # the review's case: k and a view of k shifted by one head
    ("shifted_heads", lambda b: ([b[:, :-1]], [b[:, 1:]]), r"keys\[0\] and values\[0\] overlap in memory"),
    ("shifted_tokens", lambda b: ([b[:, :, :-1]], [b[:, :, 1:]]), r"keys\[0\] and values\[0\] overlap in memory"),
    ("shifted_by_one_element", lambda b: ([b[..., :4]], [b[..., 3:7]]), r"keys\[0\] and values\[0\] overlap"),
    # a key of one layer overlapping a value of another, the others distinct
    ("key0_overlaps_value1", lambda b: ([b[..., :4], b[..., 4:6]], [b[..., 6:8], b[..., 2:4]]),
     r"keys\[0\] and values\[1\] overlap in memory"),
    ("same_view_twice", lambda b: ([b[..., :4], b[..., :4]], [b[..., 4:6], b[..., 6:8]]),
     r"keys\[0\] and keys\[1\] overlap in memory"),
    # one buffer seen as [B, H, S, D] and as [B, S, H, D]: other strides, same bytes
    ("two_layouts_of_one_buffer", lambda b: ([b.view(-1)[:120].view(2, 3, 5, 4)],
                                             [b.view(-1)[:120].view(2, 5, 3, 4).transpose(1, 2)]),
     r"keys\[0\] and values\[0\] overlap in memory"),
]

SELF_OVERLAPPING = [
    # heads one row apart on a token stride of one row: head h token s+1 is head h+1 token s
    ("overlapping_head_stride", lambda b: ([_as(b, (2, 3, 4, 4), (b.stride(0), 4, 4, 1))], [b[:, :, :4, 4:8]]),
     r"keys\[0\] has elements that share memory"),
    ("token_stride_below_row", lambda b: ([b[:, :, :4, :4]],
                                          [_as(b, (2, 3, 4, 4), (b.stride(0), b.stride(1), 2, 1), 4)]),
     r"values\[0\] has elements that share memory"),
    ("expanded_heads", lambda b: ([b[..., :4]], [b[:, :1, :, 4:8].expand(2, 3, 5, 4)]),
     r"values\[0\] has elements that share memory"),
]


def _base():
    return _buf(2, 3, 5, 8)  # [B, H, S_cap, 8]: views of it are the cache tensors


@pytest.mark.parametrize("caller", OVERLAP_CALLERS)
@pytest.mark.parametrize("case,make,pattern", OVERLAPPING + SELF_OVERLAPPING,
                         ids=[c[0] for c in OVERLAPPING + SELF_OVERLAPPING])
def test_overlapping_cache_tensors_are_refused(caller, case, make, pattern):
    buf = _base()
    keys, values = make(buf)
    mask = torch.tensor([[True, False, True, False], [False, True, True, False]])
    before = buf.clone()
    with pytest.raises(ValueError, match=pattern) as info:
        if caller == "raw":
            torch.ops.vtw.compact_kv_(keys, values, mask)
        else:
            vtw_kernels.compact_kv_(keys, values, mask, backend=caller)
    assert "vtw.compact_kv_" in str(info.value)
    assert torch.equal(bits(buf), bits(before)), "written before the error"


@pytest.mark.parametrize("case,make,pattern", OVERLAPPING + SELF_OVERLAPPING,
                         ids=[c[0] for c in OVERLAPPING + SELF_OVERLAPPING])
def test_overlap_is_refused_by_the_fake_kernel(case, make, pattern):
    # torch.compile traces the op with fake tensors (no memory): the check reasons on their
    # storage and offsets, and refuses the same views.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        buf = mode.from_tensor(_base())
        keys, values = make(buf)
        mask = torch.zeros(2, 4, dtype=torch.bool)
        with pytest.raises(ValueError, match=pattern):
            torch.ops.vtw.compact_kv_(keys, values, mask)


# (id, maker of (keys, values) from a [2, 3, 10, 12] buffer): views of one buffer sharing no byte
DISJOINT = [
    ("keys_and_values_side_by_side_Dk!=Dv", lambda b: ([b[..., :4]], [b[..., 4:12]])),
    ("three_layers_side_by_side", lambda b: ([b[..., 0:2], b[..., 2:4], b[..., 4:6]], [b[..., 6:8], b[..., 8:10],
                                                                                      b[..., 10:12]])),
    ("tokens_interleaved", lambda b: ([b[:, :, ::2]], [b[:, :, 1::2]])),
    ("heads_interleaved", lambda b: ([b.view(2, 6, 5, 12)[:, ::2]], [b.view(2, 6, 5, 12)[:, 1::2]])),
    ("head_halves", lambda b: ([b.view(2, 6, 5, 12)[:, :3]], [b.view(2, 6, 5, 12)[:, 3:]])),
    ("bshd_keys_heads_then_values_heads", lambda b: ([b.view(2, 5, 6, 12)[:, :, :3].transpose(1, 2)],
                                                     [b.view(2, 5, 6, 12)[:, :, 3:].transpose(1, 2)])),
    ("layers_of_one_allocation", lambda b: ([b.view(4, 2, 3, 5, 6)[0], b.view(4, 2, 3, 5, 6)[1]],
                                            [b.view(4, 2, 3, 5, 6)[2], b.view(4, 2, 3, 5, 6)[3]])),
]


@pytest.mark.parametrize("caller", OVERLAP_CALLERS)
@pytest.mark.parametrize("case,make", DISJOINT, ids=[c[0] for c in DISJOINT])
def test_disjoint_views_of_one_buffer_are_accepted(caller, case, make):
    g = torch.Generator().manual_seed(11)
    buf = _buf(2, 3, 10, 12, seed=3)
    keys, values = make(buf)
    mask = torch.rand(keys[0].shape[0], keys[0].shape[2] - 1, generator=g) < 0.5
    before = buf.clone()
    if caller == "raw":
        new_lens = torch.ops.vtw.compact_kv_(keys, values, mask)
    else:
        new_lens = vtw_kernels.compact_kv_(keys, values, mask, backend=caller)
    check_compaction(buf, before, lambda t: list(make(t)[0]) + list(make(t)[1]), mask, new_lens, f"{caller} {case}")


@pytest.mark.parametrize("case,make", DISJOINT, ids=[c[0] for c in DISJOINT])
def test_disjoint_views_pass_the_fake_kernel(case, make):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        keys, values = make(mode.from_tensor(_buf(2, 3, 10, 12)))
        out = torch.ops.vtw.compact_kv_(keys, values, torch.zeros(2, 4, dtype=torch.bool))
        assert out.shape == (2,)
