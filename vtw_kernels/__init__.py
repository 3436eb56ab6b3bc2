"""vtw_kernels: the operators of Visual Tokens Withdrawal.

``import vtw_kernels`` registers every ``torch.ops.vtw.*`` operator (schemas and C++ kernels
from the compiled ``_C``; fake kernels and autograd from Python) and exposes typed wrappers:

- :func:`withdraw`: gather each row's text tokens (drop the visual ones);
- :func:`compact_kv_`: the same, in place, over every layer's KV cache;
- :func:`varlen_attention`, :func:`decode_attention`: attention over the ragged text-only
  sequences and caches that withdrawal leaves.

Every wrapper takes ``backend=`` ("torch", "cpu", "cuda", "triton" or None for the fastest);
:func:`available_backends` lists what this installation has.
"""

from . import _ext
from .ops import (
    Withdrawn,
    available_backends,
    compact_kv_,
    decode_attention,
    varlen_attention,
    withdraw,
)

__version__ = "0.1.0"

HAS_C = _ext.HAS_C
WITH_CUDA = _ext.WITH_CUDA
build_hint = _ext.build_hint

if _ext.HAS_C:
    from . import _registrations

    _registrations.register()
else:
    import warnings

    warnings.warn(
        f"{_ext.build_hint()}. Only the 'torch' backend (and Triton, where available) can run; "
        "torch.ops.vtw.* is not registered.",
        RuntimeWarning,
        stacklevel=2,
    )

__all__ = [
    "Withdrawn",
    "available_backends",
    "build_hint",
    "compact_kv_",
    "decode_attention",
    "varlen_attention",
    "withdraw",
    "HAS_C",
    "WITH_CUDA",
]
