"""Triton attention kernels over the text-only sequences left by withdrawal."""

__all__: list[str] = []
