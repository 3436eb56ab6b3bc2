"""What differs between the torch releases vtw supports (2.11 to 2.15), in one place.

- **Messages of ``torch._check`` under Dynamo.** torch 2.13 to 2.15 trace a message given as a
  closure (``lambda: f"... {x}"``); torch 2.11 stops the trace ("Can't extract message from
  torch._check()"), which broke ``torch.compile(fullgraph=True)`` over the typed wrappers.
  :func:`check` passes the message where it can be traced and drops it while compiling on older
  releases (the eager path, and the C++ kernels' own checks, still say what is wrong).
- **Inductor and views of one buffer mutated by a custom op** (upstream bugs, no vtw code
  involved; pure-PyTorch reproductions in tests/test_compact_kv.py):
  (a) dynamic shapes, one graph input whose two views are mutated: the second view loses its
  storage offset (2.11, 2.13, 2.14, 2.15);
  (b) static shapes, several graph inputs that are views of one buffer: the mutated values come
  back as garbage on 2.11, right on 2.13 to 2.15;
  (c) dynamic shapes, the same graph inputs as (b): wrong on 2.13 to 2.15, right on 2.11.
  :data:`INDUCTOR_ALIASED_INPUTS_OK` says, per ``dynamic``, whether (b)/(c) hold on this torch.

2.12 was not tested; it is treated as 2.11 (the older behaviour) throughout.
"""

from __future__ import annotations

import torch

VERSION: tuple[int, int] = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])  # type: ignore[assignment]
MIN_VERSION = (2, 11)

#: Dynamo traces torch._check(cond, lambda: ...) with a closure message.
DYNAMO_CHECK_MESSAGE_CLOSURES: bool = VERSION >= (2, 13)

#: Inductor compiles a custom op mutating several graph inputs that are views of one buffer
#: correctly, by ``dynamic`` (see (b) and (c) above).
INDUCTOR_ALIASED_INPUTS_OK: dict[bool, bool] = {False: VERSION >= (2, 13), True: VERSION < (2, 13)}


def check(cond, message) -> None:
    """``torch._check(cond, message)``; while compiling on a torch whose Dynamo cannot trace the
    message closure, the condition alone (it still fails, with torch's generic message)."""
    if DYNAMO_CHECK_MESSAGE_CLOSURES or not torch.compiler.is_compiling():
        torch._check(cond, message)
    else:
        torch._check(cond)
