"""The device guard of every Triton launch.

Triton launches on the *current* CUDA device (and that device's current stream), whatever
device the tensors are on: with tensors on ``cuda:1`` while ``cuda:0`` is current, a launch
without a guard runs on the wrong GPU with pointers it cannot use. Every launcher of this
package therefore wraps its launches (and the device-side allocations and copies around them)
in ``with on_device(tensor):``, as the CUDA C++ kernels do with ``c10::cuda::CUDAGuard``.
"""

from __future__ import annotations

import contextlib

import torch


def on_device(t: torch.Tensor):
    """A context manager that makes `t`'s CUDA device the current one (a no-op context for
    tensors elsewhere: CPU tensors under Triton's interpreter)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
