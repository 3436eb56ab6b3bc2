"""Triton kernels that move tokens: withdraw and compact_kv_."""

__all__: list[str] = []
