"""The operators of CONTRACT.md are registered with the contract's schemas and kernels;
available_backends reports what is there; `import vtw_kernels` survives a missing _C."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

import vtw_kernels

# The schemas as CONTRACT.md writes them (section "Operators"), copied from its text.
CONTRACT_SCHEMAS = {
    "withdraw": "withdraw(Tensor hidden, Tensor visual_mask, SymInt? num_keep=None, bool pad_left=False) "
                "-> (Tensor out, Tensor keep_index, Tensor keep_lens)",
    "compact_kv_": "compact_kv_(Tensor(a!)[] keys, Tensor(b!)[] values, Tensor visual_mask) -> Tensor new_lens",
    "varlen_attention": "varlen_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
                        "SymInt max_seqlen_q, SymInt max_seqlen_k, float? softmax_scale=None, bool causal=True) "
                        "-> Tensor",
    "decode_attention": "decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, "
                        "float? softmax_scale=None) -> Tensor",
}
REPO = pathlib.Path(__file__).resolve().parents[1]
CONTRACT_CANDIDATES = [REPO / "CONTRACT.md", REPO / "docs" / "CONTRACT.md", REPO.parent / "shared" / "design" / "CONTRACT.md"]


@pytest.mark.parametrize("op", list(CONTRACT_SCHEMAS))
def test_schema_is_the_contracts(op):
    schema = str(getattr(torch.ops.vtw, op).default._schema)
    assert schema == "vtw::" + CONTRACT_SCHEMAS[op]


def test_schema_strings_match_contract_md():
    path = next((p for p in CONTRACT_CANDIDATES if p.is_file()), None)
    if path is None:
        pytest.skip("CONTRACT.md is not in this checkout; the schemas above are copied from it")
    text = path.read_text()
    found = {name: sig for sig, name in re.findall(r"^`((\w+)\(.*\) -> .*)`$", text, flags=re.M)}
    assert found == CONTRACT_SCHEMAS
    for op, sig in found.items():
        assert str(getattr(torch.ops.vtw, op).default._schema) == "vtw::" + sig


def test_mutated_arguments_are_marked():
    args = torch.ops.vtw.compact_kv_.default._schema.arguments
    assert [a.name for a in args] == ["keys", "values", "visual_mask"]
    assert args[0].alias_info.is_write and args[1].alias_info.is_write
    assert args[2].alias_info is None
    assert all(a.alias_info is None for a in torch.ops.vtw.withdraw.default._schema.arguments)


@pytest.mark.parametrize("op", ["withdraw", "compact_kv_"])
def test_cpu_and_meta_kernels_registered(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"vtw::{op}", "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"vtw::{op}", "Meta")  # the fake kernel


def test_withdraw_has_autograd():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("vtw::withdraw", "Autograd")


def test_available_backends():
    order = ["cuda", "triton", "cpu", "torch"]
    for op in CONTRACT_SCHEMAS:
        have = vtw_kernels.available_backends(op)
        assert have[-1] == "torch", have
        assert len(set(have)) == len(have) and set(have) <= set(order)
        assert have == sorted(have, key=order.index), "fastest first"
        if "cuda" in have:  # the C++ CUDA kernels (the CUDA key may also hold Triton's when they are absent)
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"vtw::{op}", "CUDA")
        if "triton" in have:
            import vtw_kernels.triton as tk

            assert hasattr(tk, op) and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
        # the op name may carry its namespace
        assert vtw_kernels.available_backends(f"vtw::{op}") == have
    for op in ("withdraw", "compact_kv_"):
        assert "cpu" in vtw_kernels.available_backends(op)


def test_package_reports_the_build():
    assert vtw_kernels.HAS_C
    assert "vtw_kernels._C is loaded" in vtw_kernels.build_hint()
    for name in ("withdraw", "compact_kv_", "varlen_attention", "decode_attention", "available_backends",
                 "Withdrawn"):
        assert name in vtw_kernels.__all__ and hasattr(vtw_kernels, name)
    assert vtw_kernels.Withdrawn._fields == ("out", "keep_index", "keep_lens")


# Run in a fresh interpreter where `vtw_kernels._C` cannot be imported: a meta path finder
# refuses it, as if the extension had never been built.
_NO_C = r"""
import importlib.abc, json, sys, warnings
sys.path.insert(0, sys.argv[1])

class NoC(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "vtw_kernels._C":
            raise ImportError("vtw_kernels._C hidden by the test")
        return None

sys.meta_path.insert(0, NoC())
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import vtw_kernels
import torch
from _refs import ref_withdraw, assert_withdraw_equal, check_compaction

report = {"warnings": [f"{w.category.__name__}: {w.message}" for w in caught],
          "HAS_C": vtw_kernels.HAS_C, "build_hint": vtw_kernels.build_hint(),
          "backends": vtw_kernels.available_backends("withdraw"),
          "has_op": hasattr(torch.ops.vtw, "withdraw")}
g = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    hidden = torch.randn(3, 11, 6, generator=g).to(dtype)
    mask = torch.rand(3, 11, generator=g) < 0.5
    for backend in ("torch", None):
        for num_keep, pad_left in ((None, False), (11, True)):
            res = vtw_kernels.withdraw(hidden, mask, num_keep=num_keep, pad_left=pad_left, backend=backend)
            assert_withdraw_equal(res, ref_withdraw(hidden, mask, num_keep, pad_left), str(backend))
    kv = torch.randn(2, 3, 2, 13, 4, generator=g).to(dtype)
    before = kv.clone()
    new_lens = vtw_kernels.compact_kv_(kv[0], kv[1], mask)
    check_compaction(kv, before, lambda t: [t[0], t[1]], mask, new_lens, "no _C")
try:
    vtw_kernels.withdraw(hidden, mask, backend="cpu")
    report["cpu_error"] = None
except RuntimeError as e:
    report["cpu_error"] = str(e)
print("REPORT" + json.dumps(report))
"""


def test_import_without_compiled_library():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _NO_C, str(pathlib.Path(__file__).parent)], capture_output=True,
                          text=True, env=env, cwd=str(REPO), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT"))
    report = json.loads(line[len("REPORT"):])
    assert report["HAS_C"] is False
    assert not report["has_op"], "torch.ops.vtw.withdraw must not exist without _C"
    assert "cpu" not in report["backends"] and "cuda" not in report["backends"] and report["backends"][-1] == "torch"
    hints = [w for w in report["warnings"] if w.startswith("RuntimeWarning") and "vtw_kernels._C is not loaded" in w]
    assert hints, report["warnings"]
    assert "hidden by the test" in hints[0]  # says why
    assert "pip install --no-build-isolation -e ." in hints[0]  # says how to build
    assert "pip install --no-build-isolation -e ." in report["build_hint"]
    assert report["cpu_error"] and "backend 'cpu' is not available" in report["cpu_error"]
    assert "pip install --no-build-isolation -e ." in report["cpu_error"]
