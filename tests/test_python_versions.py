"""Python 3.10 is supported but not in the CI matrix (no torch build of the matrix for it is on
the project's machines): every source file must at least compile with a 3.10 interpreter, so no
newer syntax slips in. Skipped where no Python 3.10 is installed."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python310() -> str | None:
    for cand in ("python3.10",):
        path = shutil.which(cand)
        if path and subprocess.run([path, "-c", "import sys; assert sys.version_info[:2] == (3, 10)"],
                                   capture_output=True).returncode == 0:
            return path
    if shutil.which("pyenv"):
        r = subprocess.run(["pyenv", "versions", "--bare"], capture_output=True, text=True)
        for v in sorted((v for v in r.stdout.split() if v.startswith("3.10.")), reverse=True):
            w = subprocess.run(["pyenv", "which", "python3"], capture_output=True, text=True,
                               env={**os.environ, "PYENV_VERSION": v})
            if w.returncode == 0 and w.stdout.strip():
                return w.stdout.strip()
    return None


def test_every_source_compiles_with_python_3_10(tmp_path):
    py = _python310()
    if py is None:
        pytest.skip("no Python 3.10 interpreter on this machine")
    dirs = [str(ROOT / d) for d in ("python", "vtw_kernels", "tests", "bench", "examples") if (ROOT / d).is_dir()]
    files = [str(ROOT / "setup.py")]
    # compile into a scratch folder: nothing is written into the tree
    r = subprocess.run([py, "-c", "import compileall, sys, py_compile\n"
                        "ok = all(compileall.compile_dir(d, quiet=1, ddir=d, legacy=False, workers=1,"
                        " stripdir=None) for d in sys.argv[2:-1])\n"
                        "py_compile.compile(sys.argv[-1], cfile=sys.argv[1] + '/setup.pyc', doraise=True)\n"
                        "sys.exit(0 if ok else 1)", str(tmp_path), *dirs, *files],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPYCACHEPREFIX": str(tmp_path)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
