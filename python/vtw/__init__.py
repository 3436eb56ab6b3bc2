"""vtw: Visual Tokens Withdrawal for multimodal LLMs (the integration layer over vtw_kernels).

- :func:`enable` / :func:`disable`: withdraw the visual tokens of a Hugging Face model from
  decoder layer K on (in place), or restore it exactly;
- :func:`calibrate`: choose K with the paper's KL criterion;
- importing vtw registers ``attn_implementation="vtw"`` (the vtw attention kernels) with
  transformers;
- ``python -m vtw``: the command line (demo, calibrate).
"""

__version__ = "0.1.0"

from . import attention  # noqa: E402,F401  (registers attn_implementation="vtw" with transformers)
from .calibrate import Calibration, calibrate  # noqa: E402
from .enable import disable, enable, is_enabled  # noqa: E402

__all__ = ["Calibration", "calibrate", "disable", "enable", "is_enabled", "attention"]
