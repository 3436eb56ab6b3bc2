"""bench/gpu_check.sh and its stage-1 script must work the first time they meet a GPU: the
stage-1 script runs here in its smoke mode (tiny shapes, CPU, Triton's interpreter), and the
summary reports a figure an older or cut-short JSON lacks as "missing" instead of raising."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_summary  # noqa: E402


def test_gpu_check_script_parses_and_rejects_unknown_stage(tmp_path):
    subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_check.sh")], check=True)
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "7"], capture_output=True, text=True,
                       env={**os.environ, "OUT": str(tmp_path)})
    assert r.returncode == 2 and "no stage '7'" in r.stdout


def test_stage1_smoke_runs_every_section_and_checks_pass(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_stage1.py"), "--smoke", "--device", "cpu",
                        "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "stage1.json").read_text())
    assert set(res["sections"]) == {"correctness", "copy bandwidth", "withdraw and compact_kv_", "attention",
                                    "end to end"}
    assert all(s["ok"] for s in res["sections"].values()), res["sections"]
    checks = res["sections"]["correctness"]["figures"]["checks"]
    # every op was checked on at least one fast backend, and every check passed
    assert {c["op"] for c in checks} == {"withdraw", "compact_kv_", "varlen_attention", "decode_attention"}
    assert all(c["ok"] for c in checks)
    assert res["sections"]["copy bandwidth"]["figures"]["copy_GBps"] > 0
    # the summary is the last thing printed; figures a CPU run cannot have say "missing"
    tail = r.stdout.strip().splitlines()[-len(gpu_summary.STAGE1) - 1:]
    assert tail[0].split()[0] == "figure"
    assert re.search(r"7B prefill b8 speedup\s+missing", r.stdout)


def test_summary_reports_missing_figures_instead_of_raising():
    res = {"stage": 1, "env": {"device": "cuda"},
           "sections": {"copy bandwidth": {"ok": True, "figures": {"copy_GBps": 3900.0}, "seconds": 1.0},
                        "attention": {"ok": False, "error": "RuntimeError: boom", "seconds": 2.0}}}
    text = gpu_summary.format_summary(res)
    assert "3900 GB/s" in text and "FAILED: RuntimeError: boom" in text
    assert re.search(r"varlen triton\s+missing", text)  # its section failed: reported, as missing
    # an end-to-end JSON without deep_cut (older runs) and with a skipped batch
    e2e = {"rows": [{"batch": 8, "K": 16, "prefill_speedup": 1.6, "ideal_decoder": 1.76, "ratio_decoder": 0.91,
                     "kv": {}},
                    {"batch": 32, "skipped": "out of memory"}]}
    out = gpu_summary.format_e2e(e2e)
    assert "met      prefill at batch 8" in out
    assert "missing  decode at batch 32" in out and "missing  deep-layer KV cut" in out
    assert "skipped (out of memory)" in out
