"""vtw: Visual Tokens Withdrawal for multimodal LLMs (the integration layer over vtw_kernels)."""

__version__ = "0.1.0"

from .enable import disable, enable, is_enabled  # noqa: E402
