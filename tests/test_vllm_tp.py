"""vtw.vllm with tensor parallelism 2 (two worker processes, CPU), in both KV modes: the continuously batched,
chunked-prefill, preempting workload of test_vllm_llava gives the tokens of the withdrawn model
(recomputed cache-free on the Hugging Face modules), and every KV block is free afterwards.

The engine runs in a subprocess (a TP engine cannot share a process with the in-process engine
of the other module)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

import _vllm  # noqa: E402,F401  (skips without vLLM; the engine environment)

from test_vllm_llava import LAYERS, NEW, _reference, hf, folder  # noqa: E402,F401  (fixtures)

K = 1

SCRIPT = textwrap.dedent("""
    import json, os, sys
    if __name__ == "__main__":
        from vllm import LLM
        from vtw.vllm import tiny
        llm = LLM(sys.argv[1], dtype="float32", tensor_parallel_size=2, distributed_executor_backend="mp",
                  max_model_len=128, max_num_batched_tokens=32, max_num_seqs=4, seed=0, block_size=32,
                  num_gpu_blocks_override=int(sys.argv[5]),
                  hf_overrides={"vtw_layer": int(sys.argv[2]), "vtw_kv": sys.argv[4]})
        got, preempted = tiny.run_workload(llm, int(sys.argv[3]))
        free, total = tiny.free_blocks(llm)
        print("VTW-RESULT " + json.dumps({"got": got, "preempted": preempted, "free": free, "total": total}))
        sys.stdout.flush()
        os._exit(0)
""")


@pytest.mark.parametrize("kv", ["text_only", "shared"])
def test_tp2_tokens_equal_withdrawn_model(folder, hf, tmp_path, kv):
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1",
               VLLM_CPU_OMP_THREADS_BIND="0|1", OMP_NUM_THREADS="1")
    script = tmp_path / "tp.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(folder), str(K), str(NEW), kv,
                           str(7 if kv == "shared" else 4 * 4 + 2)], env=env,
                          capture_output=True, text=True, timeout=600)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("VTW-RESULT ")), None)
    assert line is not None, f"the TP engine failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    res = json.loads(line[len("VTW-RESULT "):])
    want = _reference(hf, K)
    for (gp, gt), (wp, wt) in zip(res["got"], want):
        assert gp == wp
        assert gt == wt, f"TP=2, {kv}, K={K}: vLLM {gt} != reference {wt}"
    assert res["preempted"] > 0
    assert res["free"] == res["total"]
