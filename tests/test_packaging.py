"""The packaging metadata tells the truth (issue 17): the supported ranges of pyproject.toml and
setup.py agree, a torch outside the range (or no torch at all, as in an isolated build) gets one
clear error before anything compiles, and the CUDA build puts the toolkit's headers before the
pip wheels' newer ones. setup.py is imported as a module (its setup() call only runs as
__main__); torch is replaced by a stand-in where a version is under test."""

from __future__ import annotations

import importlib.util
import re
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _setup_module():
    spec = importlib.util.spec_from_file_location("_vtw_setup_under_test", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11 (every CI set)
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _bounds(spec: str, name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(lower, upper) of a 'name>=A.B,<C.D' requirement."""
    m = re.fullmatch(rf"{name}>=(\d+(?:\.\d+)*),<(\d+(?:\.\d+)*)", spec.replace(" ", ""))
    assert m, f"expected '{name}>=X,<Y', got {spec!r}"
    return tuple(map(int, m.group(1).split("."))), tuple(map(int, m.group(2).split(".")))


def test_supported_ranges_in_pyproject():
    meta = _pyproject()
    project = meta["project"]
    assert project["requires-python"].replace(" ", "") == ">=3.10,<3.14"
    deps = {re.match(r"[A-Za-z0-9_-]+", d).group(0): d for d in project["dependencies"]}
    assert _bounds(deps["torch"], "torch") == ((2, 11), (2, 16))
    assert _bounds(deps["transformers"], "transformers") == ((5, 17), (6,))
    assert _bounds(project["optional-dependencies"]["triton"][0], "triton") == ((3, 6), (3, 10))
    # An SPDX expression (setuptools >= 77), not the table form setuptools stops accepting.
    assert project["license"] == "Apache-2.0"
    requires = meta["build-system"]["requires"]
    assert "setuptools>=77" in requires
    # No torch in the isolated build environment: the extension must be compiled against the
    # torch it runs with, never a fresh one pip picks (setup.py then says what to do instead).
    assert not any(r.startswith("torch") for r in requires), requires


def test_setup_py_range_matches_pyproject():
    lo, hi = _setup_module().TORCH_RANGE
    p_lo, p_hi = _bounds(next(d for d in _pyproject()["project"]["dependencies"] if d.startswith("torch")), "torch")
    assert lo == p_lo and (hi[0], hi[1] + 1) == p_hi


def _fake_torch(monkeypatch, version: str | None):
    if version is None:
        monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    else:
        monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(__version__=version))


@pytest.mark.parametrize("version", ["2.11.0", "2.12.1+cpu", "2.14.1+cu130", "2.15.0", "2.15.1+cu132"])
def test_torch_in_range_is_accepted(monkeypatch, version):
    mod = _setup_module()
    _fake_torch(monkeypatch, version)
    mod._check_torch()  # no error


@pytest.mark.parametrize("version", ["2.10.2", "2.16.0", "2.16.0.dev20261201", "3.0.0", "1.13.1"])
def test_torch_outside_range_is_one_clear_error(monkeypatch, version):
    mod = _setup_module()
    _fake_torch(monkeypatch, version)
    with pytest.raises(SystemExit) as exc:
        mod._check_torch()
    msg = str(exc.value)
    assert f"torch {version} is outside the supported range (torch 2.11 to 2.15)" in msg
    assert "torch>=2.11,<2.16" in msg


def test_missing_torch_says_build_without_isolation(monkeypatch):
    mod = _setup_module()
    _fake_torch(monkeypatch, None)
    with pytest.raises(SystemExit, match=r"torch is not importable here.*pip install --no-build-isolation \."):
        mod._check_torch()


def test_extensions_check_torch_before_anything_else(monkeypatch):
    """_extensions() (what setup() evaluates first) refuses a torch outside the range before it
    looks for nvcc or imports torch.utils.cpp_extension."""
    mod = _setup_module()
    _fake_torch(monkeypatch, "2.16.0")
    monkeypatch.setattr(mod, "_find_cuda_home", lambda: pytest.fail("looked for nvcc before checking torch"))
    with pytest.raises(SystemExit, match="outside the supported range"):
        mod._extensions()


def _cuda_h(folder: Path, version: int) -> str:
    folder.mkdir(parents=True)
    (folder / "cuda.h").write_text(f"#pragma once\n#define CUDA_VERSION {version}\n")
    return str(folder)


def test_toolkit_headers_come_before_newer_pip_headers(monkeypatch, tmp_path, capsys):
    mod = _setup_module()
    toolkit_home = tmp_path / "cuda-13.0"
    toolkit = _cuda_h(toolkit_home / "include", 13000)
    cu13 = _cuda_h(tmp_path / "site" / "nvidia" / "cu13" / "include", 13020)  # torch 2.15's wheels
    cudnn = str(tmp_path / "site" / "nvidia" / "cudnn" / "include")
    Path(cudnn).mkdir(parents=True)
    monkeypatch.setattr(mod, "_pip_cuda_includes", lambda: [cu13, cudnn])
    dirs = mod._cuda_include_dirs(str(toolkit_home))
    assert dirs == [toolkit, cu13, cudnn]
    err = capsys.readouterr().err
    assert "CUDA 13.0" in err and "CUDA 13.2" in err and "come before the pip CUDA headers" in err


def test_matching_pip_headers_are_kept_quietly(monkeypatch, tmp_path, capsys):
    mod = _setup_module()
    toolkit_home = tmp_path / "cuda-13.0"
    toolkit = _cuda_h(toolkit_home / "include", 13000)
    cu13 = _cuda_h(tmp_path / "nvidia" / "cu13" / "include", 13000)  # torch 2.14.1's wheels
    monkeypatch.setattr(mod, "_pip_cuda_includes", lambda: [cu13])
    assert mod._cuda_include_dirs(str(toolkit_home)) == [toolkit, cu13]
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("env_name", ["newest", "gpu-image"])
def test_setup_env_without_the_sets_python_is_one_clear_line(env_name):
    """The default set needs Python 3.13 (gpu-image 3.12): without it, setup_env.sh stops at once
    with a line naming the set and what to do (VTW_PYTHON pointing nowhere stands in for a
    machine without that Python; nothing is created or installed)."""
    import os
    import subprocess

    r = subprocess.run(["bash", str(ROOT / "scripts" / "setup_env.sh")], capture_output=True, text=True,
                       env={**os.environ, "VTW_ENV": env_name, "VTW_PYTHON": "/nonexistent/python3"}, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"[setup_env] VTW_ENV={env_name}: no Python interpreter for this set (got '/nonexistent/python3')" in r.stderr
    if env_name == "newest":
        assert "Python 3.13" in r.stderr and "VTW_PYTHON" in r.stderr
