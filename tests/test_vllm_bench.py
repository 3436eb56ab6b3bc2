"""`python -m vtw bench --engine vllm` on the tiny preset: stock vLLM as users run it (prefix
caching on, vLLM's default compilation), stock eager, and vtw.vllm (shared and text_only) side by
side in one run; the table and bench_vllm.json come out. VLLM_CPU_CI_ENV=1 (vLLM's own CI switch)
keeps the compiled engines on Dynamo with the eager backend, so the test does not wait for
inductor."""

import json
import os
import subprocess
import sys

import _vllm  # skips without vLLM; the engine environment


def test_bench_engine_vllm_tiny(tmp_path):
    env = dict(os.environ, **_vllm.ENGINE_ENV)  # VLLM_CPU_CI_ENV=1 among them
    proc = subprocess.run([sys.executable, "-m", "vtw", "bench", "--engine", "vllm", "--preset", "tiny",
                           "--batch", "4", "--new-tokens", "2", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert "(a) most requests running at once" in out and "(b) engine" in out and "(c) chat" in out, out
    for name in ("stock", "stock_eager", "shared", "text_only"):
        assert f"    {name} " in out, out
    res = json.loads((tmp_path / "bench_vllm.json").read_text())
    assert res["layers"] == 4 and res["K"] == 2 and res["tokens"] > res["text_tokens"]
    # stock as users run it: prefix caching on, compiled; every engine keeps prefix caching on,
    # and vtw keeps vLLM's compilation as stock has it
    eng = res["engines"]
    assert all(e["prefix_caching"] for e in eng.values()), eng
    assert eng["stock"]["compilation"] != "eager" and eng["stock_eager"]["compilation"] == "eager", eng
    assert eng["shared"]["compilation"] == eng["text_only"]["compilation"] == eng["stock"]["compilation"], eng
    assert all(e["runner"].startswith("vllm.v1.worker.") for e in eng.values()), eng
    # text_only holds fewer KV blocks per request, so at least as many run at once
    assert res["most_running"]["text_only"] >= res["most_running"]["stock"] >= 1
    assert res["throughput"]["text_only"]["requests_per_s"] > 0
    # the chat's second turn reuses cached blocks in every engine (stock: the first turn, picture
    # included; vtw: the system prompt before the picture)
    for name, c in res["chat"].items():
        assert c["turn2"]["cached_tokens"] > 0, (name, c)
    assert res["chat"]["stock"]["cached_fraction_turn2"] > res["chat"]["text_only"]["cached_fraction_turn2"]
