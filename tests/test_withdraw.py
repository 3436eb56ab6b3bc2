"""withdraw on the "torch" and "cpu" backends (Triton and CUDA have their own files): bit-exact
against the loop reference of tests/_refs.py over float32/float16/bfloat16/float64, odd and degenerate
shapes, strided inputs, special payloads, autograd, opcheck and torch.compile."""

from __future__ import annotations

import pytest
import torch

import vtw_kernels
from _refs import (
    make_mask,
    FLOAT_DTYPES,
    assert_bits_equal,
    assert_withdraw_equal,
    backends,
    random_bits,
    ref_withdraw,
    ref_withdraw_grad,
    special_values,
)

BACKENDS = backends("withdraw")
DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in FLOAT_DTYPES]


def test_backends_under_test():
    # Both backends of this file must be present here: a missing one would silently shrink it.
    assert "torch" in BACKENDS
    assert "cpu" in BACKENDS, vtw_kernels.build_hint()


CASES = [
    # (B, S, D, mask kind)
    pytest.param(5, 123, 123, "random", id="5x123x123"),
    pytest.param(4, 33, 17, "mixed_rows", id="mixed_rows"),
    pytest.param(3, 40, 8, "span", id="span"),
    pytest.param(3, 9, 5, "all_visual", id="all_visual"),
    pytest.param(3, 9, 5, "no_visual", id="no_visual"),
    pytest.param(1, 1, 1, "no_visual", id="single_token_kept"),
    pytest.param(1, 1, 3, "all_visual", id="single_token_withdrawn"),
    pytest.param(0, 7, 4, "random", id="B0"),
    pytest.param(3, 0, 4, "random", id="S0"),
    pytest.param(3, 7, 0, "random", id="D0"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,S,D,kind", CASES)
@pytest.mark.parametrize("pad_left", [False, True], ids=["pad_right", "pad_left"])
@pytest.mark.parametrize("extra", [None, 0, 3], ids=["num_keep_none", "num_keep_max", "num_keep_max+3"])
def test_matches_reference(backend, dtype, B, S, D, kind, pad_left, extra):
    g = torch.Generator().manual_seed(B * 1000 + S * 10 + D)
    hidden = special_values((B, S, D), dtype, g)
    mask = make_mask(kind, B, S, g)
    max_kept = int((~mask).sum(1).max()) if B else 0
    num_keep = None if extra is None else max_kept + extra
    before = hidden.clone()
    res = vtw_kernels.withdraw(hidden, mask, num_keep=num_keep, pad_left=pad_left, backend=backend)
    assert isinstance(res, vtw_kernels.Withdrawn)
    assert_withdraw_equal(res, ref_withdraw(hidden, mask, num_keep, pad_left), f"{backend} {kind}")
    assert_bits_equal(hidden, before, "hidden must not be modified")
    assert res.out.shape == (B, max_kept if num_keep is None else num_keep, D)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_random_bit_patterns_are_copied_exactly(backend, dtype):
    # Every bit pattern of the dtype (signalling NaNs, subnormals, -0.0) must survive the copy.
    g = torch.Generator().manual_seed(7)
    hidden = random_bits((6, 50, 33), dtype, g)
    mask = torch.rand(6, 50, generator=g) < 0.3
    for pad_left in (False, True):
        res = vtw_kernels.withdraw(hidden, mask, num_keep=50, pad_left=pad_left, backend=backend)
        assert_withdraw_equal(res, ref_withdraw(hidden, mask, 50, pad_left), backend)


def _strided_inputs(dtype, g):
    """(name, hidden, mask): views that are strided in batch and sequence, with a contiguous
    last dimension (or a single-element one with any stride)."""
    big = special_values((10, 40, 24), dtype, g)
    bigmask = torch.rand(12, 50, generator=g) < 0.5
    out = [
        ("every_2nd_row_every_3rd_token", big[::2, 1::3], bigmask[::2, 1::3][:5, :13]),
        ("last_dim_slice", big[1:4, 5:30, 3:20], bigmask[:3, :25]),
        ("transposed_layout", special_values((17, 4, 9), dtype, g).transpose(0, 1), (torch.rand(17, 4, generator=g) < 0.5).t()),
        ("expanded_batch", special_values((1, 15, 6), dtype, g).expand(4, 15, 6), bigmask[:4, 3:18]),
        ("D1_stride24", big[:3, :11, 2::24], bigmask[1:4, :11]),
    ]
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pad_left", [False, True], ids=["pad_right", "pad_left"])
def test_strided_inputs(backend, dtype, pad_left):
    g = torch.Generator().manual_seed(11)
    for name, hidden, mask in _strided_inputs(dtype, g):
        assert not hidden.is_contiguous() and mask.shape == hidden.shape[:2], name
        for num_keep in (None, hidden.shape[1]):
            res = vtw_kernels.withdraw(hidden, mask, num_keep=num_keep, pad_left=pad_left, backend=backend)
            assert_withdraw_equal(res, ref_withdraw(hidden, mask, num_keep, pad_left), f"{backend} {name}")
            assert res.out.is_contiguous() and res.keep_index.is_contiguous()


@pytest.mark.parametrize("dtype", DTYPES)
def test_default_backend_and_raw_op(dtype):
    g = torch.Generator().manual_seed(3)
    hidden = special_values((3, 21, 10), dtype, g)
    mask = torch.rand(3, 21, generator=g) < 0.6
    for num_keep in (None, 21):
        for pad_left in (False, True):
            expected = ref_withdraw(hidden, mask, num_keep, pad_left)
            assert_withdraw_equal(vtw_kernels.withdraw(hidden, mask, num_keep=num_keep, pad_left=pad_left),
                                  expected, "backend=None")
            assert_withdraw_equal(torch.ops.vtw.withdraw(hidden, mask, num_keep, pad_left), expected, "positional")
            assert_withdraw_equal(torch.ops.vtw.withdraw(hidden, mask, num_keep=num_keep, pad_left=pad_left),
                                  expected, "keywords")
            assert_withdraw_equal(torch.ops.vtw.withdraw.default(hidden, mask, num_keep, pad_left), expected,
                                  "overload")


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pad_left", [False, True], ids=["pad_right", "pad_left"])
@pytest.mark.parametrize("extra", [None, 4], ids=["num_keep_none", "num_keep_max+4"])
def test_gradient_flows_to_kept_positions_only(backend, dtype, pad_left, extra):
    g = torch.Generator().manual_seed(5)
    B, S, D = 4, 19, 7
    mask = torch.rand(B, S, generator=g) < 0.5
    mask[2] = True  # a row with nothing kept
    num_keep = None if extra is None else int((~mask).sum(1).max()) + extra
    hidden = torch.randn(B, S, D, generator=g).to(dtype).requires_grad_()
    res = vtw_kernels.withdraw(hidden, mask, num_keep=num_keep, pad_left=pad_left, backend=backend)
    assert res.out.requires_grad
    assert not res.keep_index.requires_grad and not res.keep_lens.requires_grad
    grad_out = torch.randn(res.out.shape, generator=g).to(dtype)
    (grad,) = torch.autograd.grad(res.out, hidden, grad_out)
    expected = ref_withdraw_grad(hidden.shape, mask, grad_out, num_keep, pad_left)
    assert grad.dtype == dtype
    assert torch.equal(grad, expected)
    assert torch.equal(grad[mask], torch.zeros_like(grad[mask]))  # withdrawn positions


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_of_a_strided_view_lands_in_its_base(backend):
    g = torch.Generator().manual_seed(6)
    base = torch.randn(6, 30, 12, generator=g, requires_grad=True)
    hidden = base[::2, 1::3, 2:10]  # [3, 10, 8]
    mask = torch.rand(3, 10, generator=g) < 0.4
    out = vtw_kernels.withdraw(hidden, mask, num_keep=10, pad_left=True, backend=backend).out
    grad_out = torch.randn(out.shape, generator=g)
    (out * grad_out).sum().backward()
    expected = torch.zeros_like(base)
    expected[::2, 1::3, 2:10] = ref_withdraw_grad(hidden.shape, mask, grad_out, 10, True)
    assert torch.equal(base.grad, expected)


def test_gradient_matches_a_dense_float32_computation():
    # The same function written with a dense 0/1 selection matrix and a matmul in float32:
    # out[b] = P[b] @ hidden[b], P[b, j, s] = 1 where slot j holds position s.
    g = torch.Generator().manual_seed(8)
    B, S, D = 3, 12, 5
    mask = torch.rand(B, S, generator=g) < 0.5
    x = torch.randn(B, S, D, generator=g)
    _, keep_index, _ = ref_withdraw(x, mask, 14, True)
    P = torch.zeros(B, 14, S)
    for b in range(B):
        for j, s in enumerate(keep_index[b].tolist()):
            if s >= 0:
                P[b, j, s] = 1.0
    w = torch.randn(B, 14, D, generator=g)
    xd = x.clone().requires_grad_()
    ((P @ xd) * w).sum().backward()
    xo = x.clone().requires_grad_()
    (torch.ops.vtw.withdraw(xo, mask, 14, True)[0] * w).sum().backward()
    assert torch.equal(xo.grad, xd.grad)


# ----------------------------------------------------------------------------------------------
# opcheck and torch.compile of torch.ops.vtw.withdraw (CPU tensors)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_keep,pad_left", [(None, False), (None, True), (13, False), (13, True)])
@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "grad"])
def test_opcheck(num_keep, pad_left, requires_grad):
    g = torch.Generator().manual_seed(9)
    hidden = torch.randn(3, 11, 6, generator=g)[:, :, :5].requires_grad_(requires_grad)
    mask = torch.rand(3, 11, generator=g) < 0.5
    kwargs = {"pad_left": pad_left} if num_keep is None else {"num_keep": num_keep, "pad_left": pad_left}
    torch.library.opcheck(torch.ops.vtw.withdraw.default, (hidden, mask), kwargs)


def test_opcheck_empty_batch():
    torch.library.opcheck(torch.ops.vtw.withdraw.default, (torch.randn(0, 5, 3), torch.zeros(0, 5, dtype=torch.bool)),
                          {"num_keep": 2})


def _withdraw_and_use(hidden, mask):
    out, keep_index, keep_lens = torch.ops.vtw.withdraw(hidden, mask, hidden.shape[1], True)
    return out * 2, keep_index + 1, keep_lens


def _withdraw_data_dependent(hidden, mask):
    out, keep_index, keep_lens = torch.ops.vtw.withdraw(hidden, mask)
    return out * 2, keep_index + 1, keep_lens


@pytest.mark.parametrize("fn", [_withdraw_and_use, _withdraw_data_dependent], ids=["num_keep", "no_num_keep"])
def test_compile_fullgraph(fn):
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    g = torch.Generator().manual_seed(10)
    for B, S, D in ((3, 17, 8), (2, 9, 8)):
        hidden = torch.randn(B, S, D, generator=g)
        mask = torch.rand(B, S, generator=g) < 0.5
        out, idx, lens = compiled(hidden, mask)
        e_out, e_idx, e_lens = ref_withdraw(hidden, mask, S if fn is _withdraw_and_use else None,
                                            fn is _withdraw_and_use)
        assert torch.equal(out, e_out * 2) and torch.equal(idx, e_idx + 1) and torch.equal(lens, e_lens)


def test_compile_fullgraph_backward():
    torch._dynamo.reset()

    def loss(hidden, mask, w):
        return (torch.ops.vtw.withdraw(hidden, mask, 12, False)[0] * w).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    g = torch.Generator().manual_seed(12)
    hidden = torch.randn(3, 12, 4, generator=g, requires_grad=True)
    mask = torch.rand(3, 12, generator=g) < 0.5
    w = torch.randn(3, 12, 4, generator=g)
    compiled(hidden, mask, w).backward()
    assert torch.equal(hidden.grad, ref_withdraw_grad(hidden.shape, mask, w, 12, False))


def test_compile_fullgraph_of_the_python_wrapper():
    torch._dynamo.reset()
    compiled = torch.compile(lambda h, m: vtw_kernels.withdraw(h, m, num_keep=5).out, fullgraph=True,
                             backend="eager")
    hidden, mask = torch.randn(2, 5, 3), torch.rand(2, 5) < 0.5
    assert torch.equal(compiled(hidden, mask), ref_withdraw(hidden, mask, 5)[0])
