"""Test set-up shared by every test module.

- Without a GPU, the Triton kernels run on CPU tensors through Triton's interpreter: this must
  be switched on before any @triton.jit function is created, so it happens here, first.
- Tests marked `gpu` are skipped at collection time when no CUDA device is present.
- Hypothesis runs a few hundred cases per property (HYPOTHESIS_PROFILE=dev for fewer).
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("dev", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
