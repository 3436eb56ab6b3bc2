"""`python -m vtw bench --engine vllm` on the tiny preset: stock vLLM and vtw.vllm (shared and
text_only) side by side in one run; the table and bench_vllm.json come out."""

import json
import os
import subprocess
import sys

import _vllm  # skips without vLLM; the engine environment


def test_bench_engine_vllm_tiny(tmp_path):
    env = dict(os.environ, **_vllm.ENGINE_ENV)
    proc = subprocess.run([sys.executable, "-m", "vtw", "bench", "--engine", "vllm", "--preset", "tiny",
                           "--batch", "4", "--new-tokens", "2", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert "(a) most requests running at once" in out and "(b) engine" in out, out
    for name in ("stock", "shared", "text_only"):
        assert f"    {name} " in out, out
    res = json.loads((tmp_path / "bench_vllm.json").read_text())
    assert res["layers"] == 4 and res["K"] == 2 and res["tokens"] > res["text_tokens"]
    # text_only holds fewer KV blocks per request, so at least as many run at once
    assert res["most_running"]["text_only"] >= res["most_running"]["stock"] >= 1
    assert res["throughput"]["text_only"]["requests_per_s"] > 0
