"""What differs between the supported Triton versions (3.6 to 3.9), and what vtw does about it.

This is the only place in vtw that looks at Triton's version. The kernels themselves
(vtw_kernels/triton/*) are written once, in the language that all these versions accept
(``tl.cumsum``, ``tl.debug_barrier``, ``tl.dot(..., input_precision=...)``, ``tl.multiple_of``,
int-to-pointer casts with ``.to(tl.pointer_type(...))``); nothing there is version-dependent.

1. The interpreter (TRITON_INTERPRET=1) of Triton < 3.8 cannot run a loop bound given by a
   kernel argument under NumPy >= 2.4. The interpreter holds every scalar argument as a
   one-element 1-D NumPy array and converts it for ``range()`` with ``int(array)``: NumPy 2.4
   ended the deprecation of converting a 1-D array to a Python scalar, so the conversion raises
   ``TypeError: only 0-dimensional arrays can be converted to Python scalars`` (every data and
   attention kernel of vtw loops ``for s0 in range(0, S, BLOCK)``). Triton fixed it upstream
   (triton-lang/triton#9171, ``int(self.handle.data.squeeze())``); 3.8 ships the fix, 3.6.0 does
   not. :func:`install_interpreter_fixes` installs the same one-line fix into the interpreter of
   an older Triton (3.6, and 3.7, where it is the same code or a no-op). It changes nothing on a
   GPU and nothing in Triton 3.8.

2. Ahead-of-time compilation (``triton.compile(ASTSource(...), target=GPUTarget(...))``, used
   by the tests that check sm_90a code with ptxas without a GPU) has the same API in 3.6 and
   3.8: signature as ``{name: type}`` including ``"constexpr"`` entries, constexprs and
   ``attrs`` keyed by argument-index tuples. It must run in a process without
   TRITON_INTERPRET (under the interpreter, ``@triton.jit`` returns an interpreted function that
   the compiler cannot lower: ``'block_argument' object has no attribute 'get_element_ty'``) and
   should use its own cache directory, so that no earlier compile can answer for it.
   :func:`aot_compile` wraps that call.

3. The assembler for a target. Triton picks the ptxas it assembles with per architecture
   (``triton.backends.nvidia.compiler.get_ptxas(arch)``, the same call in 3.6 to 3.9): 3.6 to
   3.8 take the bundled ``bin/ptxas`` below sm_100, but 3.9 takes ``bin/ptxas-blackwell`` from
   sm_90 on and emits PTX of a version (9.4) that the older bundled ptxas (CUDA 12.9) refuses
   (``ptxas fatal: Unsupported .version 9.4``). :func:`ptxas` asks Triton, so a spill check
   assembles exactly as Triton would (honouring ``TRITON_PTXAS_PATH`` and the like).
"""

from __future__ import annotations

import os
import re
import subprocess

import triton

__all__ = ["VERSION", "interpreting", "install_interpreter_fixes", "aot_compile", "ptxas"]


def _parse(version: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


VERSION: tuple[int, int] = _parse(triton.__version__)
"""(major, minor) of the installed Triton."""


def interpreting() -> bool:
    """Whether Triton's interpreter runs the kernels (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


_fixed = False


def install_interpreter_fixes() -> None:
    """Makes the interpreter of Triton < 3.8 work under NumPy >= 2.4 (item 1 of the module
    docstring). Idempotent; does nothing on Triton >= 3.8 or when the interpreter is off."""
    global _fixed
    if _fixed or VERSION >= (3, 8) or not interpreting():
        return
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:  # an interpreter laid out differently: leave it alone
        return

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        # Every scalar is a one-element array; squeeze it before int() (what Triton 3.8 does).
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = _patch_lang_tensor
    _fixed = True


def ptxas(arch: int = 90) -> str | None:
    """Path of the ptxas Triton assembles ``sm_<arch>`` code with (item 3 of the module
    docstring), or None when this Triton has no usable NVIDIA assembler."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        path = get_ptxas(arch).path
    except (ImportError, AttributeError, RuntimeError, OSError, subprocess.SubprocessError):
        return None
    return path if path and os.path.exists(path) else None


def aot_compile(kernel, signature: dict, constexprs: dict, *, attrs: dict | None = None, arch: int = 90,
                num_warps: int = 4, num_stages: int = 1):
    """Compiles a ``@triton.jit`` kernel ahead of time for ``sm_<arch>`` (no GPU needed) and
    returns Triton's compiled kernel (``.asm["ptx"]``, ``.asm["ttgir"]``, ...).

    `signature` maps every non-constexpr argument to its Triton type ("*fp16", "i32", ...);
    `constexprs` maps the constexpr arguments to their values; `attrs` maps argument-index
    tuples to attributes (``[["tt.divisibility", 16]]``). Must run without TRITON_INTERPRET
    (item 2 of the module docstring): it raises RuntimeError otherwise.
    """
    if interpreting():
        raise RuntimeError("vtw_kernels.compat.triton.aot_compile: TRITON_INTERPRET=1 is set; compile in a "
                           "process without it (the interpreter's @triton.jit cannot be lowered)")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(signature)
    sig.update({k: "constexpr" for k in constexprs})
    src = ASTSource(kernel, sig, dict(constexprs), attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})
