"""Lets a CUDA build of torchvision import next to a CPU build of torch (the vLLM CPU set).

PyPI's torchvision wheels for Linux are CUDA builds; next to ``torch==X+cpu`` their compiled
ops (``torchvision/_C.so``) fail to load, and torchvision's Python side then dies at import on
``operator torchvision::nms does not exist`` (its fake-tensor registrations name ops that were
never declared). vLLM imports torchvision on the way to its LLaVA (through transformers' pixtral
image processing) in every process it spawns.

This module is installed into the vLLM environment's site-packages as ``_vtw_torchvision_shim``
and loaded by a ``.pth`` file (scripts/envs/vllm.sh), so it runs at interpreter start in every
process. It costs nothing until something imports torchvision: a meta-path hook then, once,
declares the schemas of the ops torchvision registers fake kernels for (only those that are
missing), and lets the import proceed. The pure-Python parts (transforms, io of PIL images)
work; calling a compiled op (nms, roi_align, ...) still fails, loudly.
"""

import importlib.abc
import sys

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_keep = []  # the torch.library.Library object must stay alive


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path[:] = [f for f in sys.meta_path if f is not self]
        try:
            import torch

            missing = {}
            for op, schema in _SCHEMAS.items():
                try:
                    torch._C._dispatch_find_schema_or_throw(f"torchvision::{op}", "")
                except RuntimeError:
                    missing[op] = schema
            if missing:
                # Only when torchvision's own ops will not load: try them first.
                try:
                    from importlib.util import find_spec

                    spec = find_spec("torchvision")
                    import os

                    so = None
                    if spec and spec.submodule_search_locations:
                        d = list(spec.submodule_search_locations)[0]
                        so = next((os.path.join(d, f) for f in os.listdir(d)
                                   if f.startswith("_C") and f.endswith(".so")), None)
                    if so:
                        torch.ops.load_library(so)
                        missing = {}
                except Exception:
                    pass
            if missing:
                lib = torch.library.Library("torchvision", "FRAGMENT")
                for schema in missing.values():
                    lib.define(schema)
                _keep.append(lib)
        except Exception:  # never break interpreter start-up
            pass
        return None


if not any(isinstance(f, _Hook) for f in sys.meta_path):
    sys.meta_path.insert(0, _Hook())
