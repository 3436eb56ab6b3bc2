"""Loads the compiled operator library `vtw_kernels._C`, if it was built.

Importing `_C` runs the library's static initialisers, which define the `torch.ops.vtw.*`
schemas and register the C++ CPU (and, when built, CUDA) kernels. Without it, `vtw_kernels`
still imports: the `torch` backend (and Triton, where available) keep working, and
`build_hint()` says what is missing and how to build it.
"""

from __future__ import annotations

import torch

HAS_C = False
WITH_CUDA = False
LOAD_ERROR: str | None = None
# Ops whose CUDA dispatch key holds a Triton kernel (registered by _registrations because no
# compiled CUDA kernel exists): has_kernel(op, "CUDA") is then true without a "cuda" backend.
TRITON_ON_CUDA_KEY: set[str] = set()

try:
    from . import _C  # type: ignore[attr-defined]  # noqa: F401

    HAS_C = True
    WITH_CUDA = bool(getattr(_C, "WITH_CUDA", 0))
except ImportError as exc:  # not built, or built against another torch
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"

BUILD_HINT = (
    "build it from the repository root with `pip install --no-build-isolation -e .` "
    "(CUDA kernels are compiled when nvcc and a CUDA build of torch are present; "
    "VTW_BUILD_CUDA=0 forces a CPU-only build, VTW_BUILD_CUDA=1 requires CUDA)"
)


def build_hint() -> str:
    """A sentence saying whether the compiled library loaded, and how to build it if not."""
    if HAS_C:
        kind = "with CUDA kernels" if WITH_CUDA else "CPU kernels only (built without CUDA)"
        return f"vtw_kernels._C is loaded: {kind}"
    return f"vtw_kernels._C is not loaded ({LOAD_ERROR}); {BUILD_HINT}"


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether torch.ops.vtw.<op> has a kernel registered for the dispatch key ("CPU", "CUDA")."""
    if not HAS_C:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"vtw::{op}", dispatch_key)
