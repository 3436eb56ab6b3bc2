"""Builds and installs both packages of vtw: `vtw_kernels` (with its compiled `_C` operator
library) and `vtw` (the integration layer, in python/vtw).

The CUDA kernels are compiled whenever a CUDA toolkit (nvcc) and a CUDA build of torch are
present, whether or not a GPU is. Environment switches:

  VTW_BUILD_CUDA=0|1      force a CPU-only build (0) or require the CUDA build (1)
  TORCH_CUDA_ARCH_LIST    architectures to compile for (default: DEFAULT_ARCHS below)
  MAX_JOBS                parallel compile jobs (default: capped by cores and memory)
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# FlashAttention's list (Ampere, Hopper, Blackwell), with PTX of the newest for later GPUs.
DEFAULT_ARCHS = "8.0;9.0;10.0;12.0+PTX"
# The torch releases vtw supports (major, minor), first and last: pyproject.toml's
# `torch>=2.11,<2.16` says the same (tests/test_packaging.py checks that they agree).
TORCH_RANGE = ((2, 11), (2, 15))
_WITH_CUDA = False


def _log(msg: str) -> None:
    print(f"[vtw setup] {msg}", file=sys.stderr)


def _check_torch() -> None:
    """One clear error, before anything compiles, when the torch the extension would be compiled
    against is missing or outside TORCH_RANGE (the compiled library only loads into the torch it
    was built with)."""
    lo, hi = TORCH_RANGE
    wanted = f"torch {lo[0]}.{lo[1]} to {hi[0]}.{hi[1]}"
    try:
        import torch
    except ImportError:
        raise SystemExit(
            f"[vtw setup] torch is not importable here. vtw compiles against the torch it will run "
            f"with: install {wanted} first, then build without build isolation: "
            f"`pip install --no-build-isolation .` (a plain `pip install .` builds in an isolated "
            f"environment without your torch)") from None
    m = re.match(r"(\d+)\.(\d+)", torch.__version__)
    have = (int(m.group(1)), int(m.group(2))) if m else None
    if have is None or not lo <= have <= hi:
        raise SystemExit(
            f"[vtw setup] torch {torch.__version__} is outside the supported range ({wanted}); "
            f"install a torch in that range (e.g. `pip install 'torch>={lo[0]}.{lo[1]},"
            f"<{hi[0]}.{hi[1] + 1}'`), then build again")


def _find_cuda_home() -> str | None:
    """The real toolkit folder. /usr/local/bin/nvcc may be a wrapper script, from which torch
    would guess CUDA_HOME=/usr/local; nvcc itself reports its TOP folder in a dry run."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")) and os.path.isdir(
            os.path.join(home, "include")
        ):
            return os.path.realpath(home)
    nvcc = shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None
    )
    if nvcc is None:
        return None
    try:
        probe = os.path.join(ROOT, "build", "nvcc_probe.cu")
        os.makedirs(os.path.dirname(probe), exist_ok=True)
        with open(probe, "w") as f:
            f.write("int main() { return 0; }\n")
        dry = subprocess.run(
            [nvcc, "--dryrun", "-c", probe, "-o", probe + ".o"],
            capture_output=True, text=True, timeout=60,
        )
        m = re.search(r"TOP=(\S+)", dry.stdout + dry.stderr)
        if m:
            return os.path.realpath(m.group(1).rstrip("/").removesuffix("/bin/.."))
    except (OSError, subprocess.SubprocessError):
        pass
    return os.path.realpath(os.path.join(os.path.dirname(os.path.realpath(nvcc)), ".."))


def _pip_cuda_includes() -> list[str]:
    """Headers of the pip CUDA wheels (ATen's CUDA headers include cusparse.h, cublas.h, ...,
    which a minimal toolkit lacks)."""
    out = []
    try:
        import nvidia  # the namespace package of the nvidia-* wheels torch depends on

        for base in nvidia.__path__:
            out += sorted(glob.glob(os.path.join(base, "*", "include")))
    except ImportError:
        pass
    return [p for p in out if os.path.isdir(p)]


def _cuda_version_h(include_dir: str) -> tuple[int, int] | None:
    """The CUDA version (major, minor) whose headers lie in include_dir (from cuda.h)."""
    try:
        with open(os.path.join(include_dir, "cuda.h")) as f:
            m = re.search(r"#define\s+CUDA_VERSION\s+(\d+)", f.read())
    except OSError:
        return None
    return (int(m.group(1)) // 1000, int(m.group(1)) % 1000 // 10) if m else None


def _cuda_include_dirs(cuda_home: str) -> list[str]:
    """Include folders for the CUDA build: the toolkit's own headers first, then the pip CUDA
    wheels' for the libraries the toolkit lacks. The toolkit's must win: torch's CUDA wheels may
    carry a newer CUDA (torch 2.15: 13.2) than the machine's nvcc (13.0), and nvcc refuses the
    newer runtime headers (cuda_toolkit.h: "CUDA compiler and CUDA toolkit headers are
    incompatible"). A toolkit whose major version differs from torch's CUDA is refused by
    torch.utils.cpp_extension itself, with its own message."""
    toolkit = os.path.join(cuda_home, "include")
    pip = _pip_cuda_includes()
    tk_v = _cuda_version_h(toolkit)
    newer = [(p, v) for p in pip if (v := _cuda_version_h(p)) is not None and tk_v is not None and v > tk_v]
    if newer:
        p, v = newer[0]
        _log(f"the CUDA toolkit's headers ({toolkit}, CUDA {tk_v[0]}.{tk_v[1]}) come before the pip "
             f"CUDA headers ({p}, CUDA {v[0]}.{v[1]}): nvcc {tk_v[0]}.{tk_v[1]} cannot compile the "
             "newer runtime headers; the pip ones only serve the libraries the toolkit lacks")
    return [toolkit] + [p for p in pip if os.path.realpath(p) != os.path.realpath(toolkit)]


def _max_jobs() -> str:
    if os.environ.get("MAX_JOBS"):
        return os.environ["MAX_JOBS"]
    cores = os.cpu_count() or 1
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gb = 8.0
    # nvcc on a templated ATen translation unit peaks near 4 GB.
    return str(max(1, min(cores, int(mem_gb // 4))))


def _want_cuda() -> tuple[bool, str]:
    flag = os.environ.get("VTW_BUILD_CUDA", "").strip()
    if flag == "0":
        return False, "VTW_BUILD_CUDA=0"
    import torch  # noqa: F401  (imported after CUDA_HOME is set)

    if torch.version.cuda is None:
        why = f"torch {torch.__version__} is a CPU build"
    elif os.environ.get("CUDA_HOME") is None:
        why = "no CUDA toolkit (nvcc) was found; set CUDA_HOME or put nvcc on PATH"
    else:
        return True, f"CUDA toolkit {os.environ['CUDA_HOME']}, torch CUDA {torch.version.cuda}"
    if flag == "1":
        raise SystemExit(f"[vtw setup] VTW_BUILD_CUDA=1 but the CUDA build is impossible: {why}")
    return False, why


def _extensions():
    _check_torch()
    cuda_home = None if os.environ.get("VTW_BUILD_CUDA") == "0" else _find_cuda_home()
    if cuda_home:
        # torch.utils.cpp_extension reads CUDA_HOME at import: set it first.
        os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("MAX_JOBS", _max_jobs())
    with_cuda, why = _want_cuda()
    global _WITH_CUDA
    _WITH_CUDA = with_cuda

    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-std=c++20", "-fdiagnostics-color=always"]
    if sys.platform != "win32":
        cxx.append("-fopenmp")
    define_macros = [("Py_LIMITED_API", "0x03090000")]
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
        if not os.environ["TORCH_CUDA_ARCH_LIST"].strip():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
        _log(f"building the CUDA kernels ({why}) for {os.environ['TORCH_CUDA_ARCH_LIST']}, "
             f"MAX_JOBS={os.environ['MAX_JOBS']}")
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        ext = CUDAExtension(
            "vtw_kernels._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")] + _cuda_include_dirs(os.environ["CUDA_HOME"]),
            define_macros=define_macros + [("VTW_WITH_CUDA", None)],
            extra_compile_args={
                "cxx": cxx,
                "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"],
            },
            extra_link_args=["-fopenmp"] if sys.platform != "win32" else [],
            py_limited_api=True,
        )
    else:
        _log(f"CPU-only build ({why}): the CUDA kernels are skipped; CUDA tensors will use the "
             "Triton kernels where Triton is installed")
        ext = CppExtension(
            "vtw_kernels._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"] if sys.platform != "win32" else [],
            py_limited_api=True,
        )
    return [ext]


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    class Build(BuildExtension):
        """Keeps the object files in build/temp.* (pip's editable builds otherwise use a fresh
        temporary folder each time), so ninja rebuilds only what changed."""

        def finalize_options(self):
            super().finalize_options()
            self.build_temp = os.path.join(ROOT, "build", "temp." + ("cuda" if _WITH_CUDA else "cpu"))

    return Build.with_options(no_python_abi_suffix=True)


# Guarded so that tests can import this file for its helpers; pip (setuptools.build_meta) and
# `python setup.py ...` both run it as __main__.
if __name__ == "__main__":
    setup(
        packages=find_packages(include=["vtw_kernels", "vtw_kernels.*"])
        + find_packages("python", include=["vtw", "vtw.*"]),
        package_dir={"vtw_kernels": "vtw_kernels", "vtw": "python/vtw"},
        package_data={"vtw": ["embedded/model/*.json", "embedded/model/*.safetensors"]},
        ext_modules=_extensions(),
        cmdclass={"build_ext": _build_ext()},
        options={"bdist_wheel": {"py_limited_api": "cp39"}},
    )
