"""Every invalid argument of withdraw and compact_kv_ (CONTRACT.md) raises an error whose
message names the argument, through the Python wrapper (every backend of this file, and
backend=None) and through the raw torch.ops.vtw.* call; nothing is written before the error.
Also: backend selection errors and available_backends of an unknown op.

A meta tensor stands in for "another device": it mixes with CPU tensors like a CUDA one would.
"""

from __future__ import annotations

import pytest
import torch

import vtw_kernels
from _refs import backends, bits

ERRORS = (TypeError, ValueError, RuntimeError)
WITHDRAW_CALLERS = [pytest.param(b, id=f"wrapper-{b}") for b in backends("withdraw") + [None]] + ["raw"]
COMPACT_CALLERS = [pytest.param(b, id=f"wrapper-{b}") for b in backends("compact_kv_") + [None]] + ["raw"]


def _call_withdraw(caller, hidden, mask, num_keep=None, pad_left=False):
    if caller == "raw":
        return torch.ops.vtw.withdraw(hidden, mask, num_keep, pad_left)
    return vtw_kernels.withdraw(hidden, mask, num_keep=num_keep, pad_left=pad_left, backend=caller)


def _call_compact(caller, keys, values, mask):
    if caller == "raw":
        return torch.ops.vtw.compact_kv_(keys, values, mask)
    return vtw_kernels.compact_kv_(keys, values, mask, backend=caller)


H = lambda *s, dtype=torch.float32: torch.randn(*s).to(dtype)  # noqa: E731
M = lambda *s: torch.rand(*s) < 0.5  # noqa: E731

# (id, hidden, mask, num_keep, message pattern)
WITHDRAW_BAD = [
    ("hidden_int32", lambda: (torch.ones(2, 5, 4, dtype=torch.int32), M(2, 5), None),
     r"hidden must be float32, float16, bfloat16 or float64, got (int32|Int)"),
    ("hidden_complex64", lambda: (torch.zeros(2, 5, 4, dtype=torch.complex64), M(2, 5), None),
     r"hidden must be float32, float16, bfloat16 or float64, got (complex64|ComplexFloat)"),
    ("mask_int64", lambda: (H(2, 5, 4), torch.zeros(2, 5, dtype=torch.int64), None),
     r"visual_mask must be a bool tensor, got (int64|Long)"),
    ("mask_uint8", lambda: (H(2, 5, 4), torch.zeros(2, 5, dtype=torch.uint8), None),
     r"visual_mask must be a bool tensor"),
    ("mask_float", lambda: (H(2, 5, 4), torch.zeros(2, 5), None), r"visual_mask must be a bool tensor"),
    ("hidden_2d", lambda: (H(5, 4), M(2, 5), None), r"hidden must be 3-D \[B, S, D\], got 2-D"),
    ("hidden_4d", lambda: (H(2, 5, 4, 1), M(2, 5), None), r"hidden must be 3-D \[B, S, D\], got 4-D"),
    ("mask_1d", lambda: (H(2, 5, 4), M(5), None), r"visual_mask must be 2-D \[B, S\], got 1-D"),
    ("mask_3d", lambda: (H(2, 5, 4), M(2, 5, 1), None), r"visual_mask must be 2-D \[B, S\], got 3-D"),
    ("mask_longer", lambda: (H(2, 5, 4), M(2, 6), None), r"visual_mask must have shape \[B, S\] = \[2, 5\]"),
    ("mask_more_rows", lambda: (H(2, 5, 4), M(3, 5), None), r"visual_mask must have shape \[B, S\] = \[2, 5\]"),
    ("hidden_last_dim_strided", lambda: (H(2, 5, 8)[..., ::2], M(2, 5), None),
     r"hidden must have a contiguous last dimension"),
    ("hidden_transposed", lambda: (H(2, 4, 5).transpose(1, 2), M(2, 5), None),
     r"hidden must have a contiguous last dimension"),
    ("num_keep_negative", lambda: (H(2, 5, 4), M(2, 5), -1), r"num_keep must be >= 0"),
    ("mask_other_device", lambda: (H(2, 5, 4), M(2, 5).to("meta"), None),
     r"visual_mask must be on the device of hidden \(cpu\), got meta"),
    ("hidden_other_device", lambda: (H(2, 5, 4).to("meta"), M(2, 5), None),
     r"visual_mask must be on the device of hidden \(meta\), got cpu"),
]


@pytest.mark.parametrize("caller", WITHDRAW_CALLERS)
@pytest.mark.parametrize("case,make,pattern", WITHDRAW_BAD, ids=[c[0] for c in WITHDRAW_BAD])
def test_withdraw_bad_input(caller, case, make, pattern):
    hidden, mask, num_keep = make()
    with pytest.raises(ERRORS, match=pattern) as info:
        _call_withdraw(caller, hidden, mask, num_keep)
    assert "vtw.withdraw" in str(info.value) or "vtw::withdraw" in str(info.value)


@pytest.mark.parametrize("caller", WITHDRAW_CALLERS)
@pytest.mark.parametrize("pad_left", [False, True])
def test_num_keep_below_a_rows_kept_count_raises(caller, pad_left):
    mask = torch.tensor([[True, False, True, True, True],
                         [False, False, True, False, True],  # row 1 keeps 3
                         [True, True, True, True, True]])
    hidden = H(3, 5, 4)
    for num_keep in (0, 1, 2):
        with pytest.raises(ValueError, match=rf"num_keep must be >= the number of kept tokens.*num_keep = "
                                             rf"{num_keep}.*row 1 keeps 3"):
            _call_withdraw(caller, hidden, mask, num_keep, pad_left)
    # exactly the maximum is fine
    out = _call_withdraw(caller, hidden, mask, 3, pad_left)[0]
    assert out.shape == (3, 3, 4)


@pytest.mark.parametrize("caller", WITHDRAW_CALLERS)
def test_withdraw_wrong_argument_types(caller):
    hidden, mask = H(2, 5, 4), M(2, 5)
    with pytest.raises(ERRORS, match=r"hidden"):
        _call_withdraw(caller, hidden.tolist(), mask)
    with pytest.raises(ERRORS, match=r"visual_mask"):
        _call_withdraw(caller, hidden, mask.tolist())
    with pytest.raises(ERRORS, match=r"num_keep"):
        _call_withdraw(caller, hidden, mask, 2.5)


@pytest.mark.parametrize("backend", backends("withdraw") + [None])
def test_withdraw_wrapper_rejects_bool_num_keep(backend):
    with pytest.raises(TypeError, match=r"num_keep must be an int or None, got bool"):
        vtw_kernels.withdraw(H(2, 5, 4), M(2, 5), num_keep=True, backend=backend)


# ----------------------------------------------------------------------------------------------
# compact_kv_
# ----------------------------------------------------------------------------------------------

def _good():
    keys = [H(2, 3, 8, 4), H(2, 3, 8, 4)]
    values = [H(2, 3, 8, 6), H(2, 3, 8, 6)]
    return keys, values, M(2, 6)


def _with(i_list, i, t):
    def make():
        keys, values, mask = _good()
        (keys if i_list == 0 else values)[i] = t()
        return keys, values, mask
    return make


def _mask(m):
    def make():
        keys, values, _ = _good()
        return keys, values, m()
    return make


def _same_twice():
    keys, values, mask = _good()
    keys[1] = keys[0]
    return keys, values, mask


def _key_is_value():
    keys, values, mask = _good()
    values = [keys[1], values[1]]
    return keys, values, mask


def _all(fn):
    def make():
        keys, values, mask = _good()
        return [fn(k) for k in keys], [fn(v) for v in values], mask
    return make


# (id, maker of (keys, values, mask), message pattern)
COMPACT_BAD = [
    ("keys1_complex64", _with(0, 1, lambda: torch.zeros(2, 3, 8, 4, dtype=torch.complex64)),
     r"keys\[1\] must be float32, float16, bfloat16 or float64, got (complex64|ComplexFloat)"),
    ("values0_int32", _with(1, 0, lambda: torch.ones(2, 3, 8, 6, dtype=torch.int32)),
     r"values\[0\] must be float32, float16, bfloat16 or float64"),
    ("mask_int", _mask(lambda: torch.zeros(2, 6, dtype=torch.int32)), r"visual_mask must be a bool tensor"),
    ("mask_1d", _mask(lambda: M(6)), r"visual_mask must be 2-D \[B, S\]"),
    ("mask_3d", _mask(lambda: M(2, 6, 1)), r"visual_mask must be 2-D \[B, S\]"),
    ("keys0_3d", _with(0, 0, lambda: H(3, 8, 4)), r"keys\[0\] must be 4-D \[B, H, S_cap, Dh\], got 3-D"),
    ("values1_5d", _with(1, 1, lambda: H(2, 3, 8, 6, 1)), r"values\[1\] must be 4-D \[B, H, S_cap, Dh\], got 5-D"),
    ("count_mismatch", lambda: (_good()[0], _good()[1][:1], _good()[2]),
     r"keys and values must hold one tensor per layer each, got 2 keys and 1 values"),
    ("S_cap_below_S", lambda: ([H(2, 3, 5, 4)], [H(2, 3, 5, 6)], M(2, 6)),
     r"keys\[0\] must have S_cap >= S = 6 \(the length of visual_mask\), got S_cap = 5"),
    ("values_other_H", _with(1, 0, lambda: H(2, 4, 8, 6)), r"values\[0\] must share H and S_cap with keys\[0\]"),
    ("keys_other_S_cap", _with(0, 1, lambda: H(2, 3, 9, 4)), r"keys\[1\] must share H and S_cap with keys\[0\]"),
    ("values_other_batch", _with(1, 1, lambda: H(3, 3, 8, 6)), r"values\[1\] must have batch size B = 2"),
    ("mask_other_batch", _mask(lambda: M(3, 6)), r"keys\[0\] must have batch size B = 3"),
    ("keys1_last_dim_strided", _with(0, 1, lambda: H(2, 3, 8, 8)[..., ::2]),
     r"keys\[1\] must have a contiguous last dimension"),
    ("same_tensor_twice", _same_twice, r"keys\[0\] and keys\[1\] overlap in memory"),
    ("key_passed_as_value", _key_is_value, r"keys\[1\] and values\[0\] overlap in memory"),
    ("expanded_batch", _with(0, 0, lambda: H(1, 3, 8, 4).expand(2, 3, 8, 4)), r"keys\[0\] has elements that share memory"),
    ("expanded_tokens", _with(1, 1, lambda: H(2, 3, 1, 6).expand(2, 3, 8, 6)), r"values\[1\] has elements that share memory"),
    ("keys1_other_device", _with(0, 1, lambda: H(2, 3, 8, 4).to("meta")),
     r"keys\[1\] must be on the device of visual_mask \(cpu\), got meta"),
    ("mask_other_device", _mask(lambda: M(2, 6).to("meta")),
     r"keys\[0\] must be on the device of visual_mask \(meta\), got cpu"),
]


@pytest.mark.parametrize("caller", COMPACT_CALLERS)
@pytest.mark.parametrize("case,make,pattern", COMPACT_BAD, ids=[c[0] for c in COMPACT_BAD])
def test_compact_kv_bad_input(caller, case, make, pattern):
    keys, values, mask = make()
    snapshot = [bits(t).clone() for t in keys + values if t.device.type == "cpu" and t.is_floating_point()]
    with pytest.raises(ERRORS, match=pattern) as info:
        _call_compact(caller, keys, values, mask)
    assert "vtw.compact_kv_" in str(info.value)
    # the error came before any write
    after = [bits(t) for t in keys + values if t.device.type == "cpu" and t.is_floating_point()]
    assert all(torch.equal(a, b) for a, b in zip(after, snapshot))


@pytest.mark.parametrize("caller", COMPACT_CALLERS)
def test_compact_kv_wrong_argument_types(caller):
    keys, values, mask = _good()
    with pytest.raises(ERRORS, match=r"keys"):
        _call_compact(caller, [keys[0], 3], values, mask)
    with pytest.raises(ERRORS, match=r"visual_mask"):
        _call_compact(caller, keys, values, mask.tolist())


# ----------------------------------------------------------------------------------------------
# backends
# ----------------------------------------------------------------------------------------------

def test_unknown_backend_name():
    for call in (lambda: vtw_kernels.withdraw(H(2, 5, 4), M(2, 5), backend="gpu"),
                 lambda: vtw_kernels.compact_kv_(H(2, 1, 5, 4), H(2, 1, 5, 4), M(2, 5), backend="Torch")):
        with pytest.raises(ValueError, match=r"backend must be one of \('torch', 'cpu', 'cuda', 'triton'\) or None"):
            call()


def test_available_backends_of_an_unknown_op():
    with pytest.raises(ValueError, match=r"unknown op 'withdraw_'.*expected one of"):
        vtw_kernels.available_backends("withdraw_")
    with pytest.raises(ValueError, match=r"unknown op 'matmul'"):
        vtw_kernels.available_backends("matmul")


def test_cuda_backend_with_cpu_tensors_or_missing():
    # Without a CUDA device here, backend="cuda" on CPU tensors must fail: either the CUDA
    # kernels are not in this build (the message says how to get them), or the tensors are on
    # the wrong device (the message says so). It never silently runs something else.
    for op, call in (("withdraw", lambda: vtw_kernels.withdraw(H(2, 5, 4), M(2, 5), backend="cuda")),
                     ("compact_kv_", lambda: vtw_kernels.compact_kv_(H(2, 1, 5, 4), H(2, 1, 5, 4), M(2, 5),
                                                                     backend="cuda"))):
        if "cuda" in vtw_kernels.available_backends(op):
            with pytest.raises(ValueError, match=rf"vtw.{op}: backend 'cuda' needs CUDA tensors, got tensors on cpu"):
                call()
        else:
            with pytest.raises(RuntimeError, match=rf"vtw.{op}: backend 'cuda' is not available: .*(build|CUDA)"):
                call()


def test_cpu_backend_with_tensors_on_another_device():
    with pytest.raises(ValueError, match=r"backend 'cpu' needs CPU tensors, got tensors on meta"):
        vtw_kernels.withdraw(H(2, 5, 4).to("meta"), M(2, 5).to("meta"), backend="cpu")


def test_missing_cuda_build_says_how_to_build(monkeypatch):
    ext = vtw_kernels._ext
    monkeypatch.setattr(ext, "WITH_CUDA", False)
    real = ext.has_kernel
    monkeypatch.setattr(ext, "has_kernel", lambda op, key: False if key == "CUDA" else real(op, key))
    assert "cuda" not in vtw_kernels.available_backends("withdraw")
    with pytest.raises(RuntimeError, match=r"backend 'cuda' is not available: .*built without CUDA.*"
                                           r"VTW_BUILD_CUDA=1 pip install --no-build-isolation -e \."):
        vtw_kernels.withdraw(H(2, 5, 4), M(2, 5), backend="cuda")


def test_missing_compiled_library_says_how_to_build(monkeypatch):
    ext = vtw_kernels._ext
    monkeypatch.setattr(ext, "HAS_C", False)
    monkeypatch.setattr(ext, "LOAD_ERROR", "ImportError: test")
    assert vtw_kernels.available_backends("compact_kv_")[-1] == "torch"
    assert "cpu" not in vtw_kernels.available_backends("compact_kv_")
    for backend in ("cpu", "cuda"):
        with pytest.raises(RuntimeError, match=rf"backend '{backend}' is not available: vtw_kernels._C is not "
                                               r"loaded .*pip install --no-build-isolation -e \."):
            vtw_kernels.compact_kv_(H(2, 1, 5, 4), H(2, 1, 5, 4), M(2, 5), backend=backend)


def test_missing_triton_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr(vtw_kernels.ops, "_triton_impls", lambda: None)
    assert "triton" not in vtw_kernels.available_backends("withdraw")
    with pytest.raises(RuntimeError, match=r"backend 'triton' is not available: install Triton \(pip install "
                                           r"triton\).*TRITON_INTERPRET=1"):
        vtw_kernels.withdraw(H(2, 5, 4), M(2, 5), backend="triton")
