"""The short summary table that ends each stage of bench/gpu_check.sh, from the stage's JSON.

A figure the run did not produce (a section that failed or was cut short, a backend that is
not there, a key an older JSON lacks) is printed as "missing", never raised.

    python bench/gpu_summary.py OUT/stage1.json
    python bench/gpu_summary.py --e2e OUT/e2e-llava-1.5-7b/bench.json   (python -m vtw bench's JSON)
"""

from __future__ import annotations

import json
import math
import sys

# (label, section, key, format, target: (op, value) or None)
STAGE1 = [
    ("device copy bandwidth", "copy bandwidth", "copy_GBps", "{:.0f} GB/s", None),
    ("withdraw cuda", "withdraw and compact_kv_", "withdraw_cuda_GBps", "{:.0f} GB/s", None),
    ("  share of copy", "withdraw and compact_kv_", "withdraw_cuda_of_copy", "{:.2f}", (">=", 0.7)),
    ("  vs boolean indexing", "withdraw and compact_kv_", "withdraw_cuda_vs_bool_index", "{:.2f}x", (">=", 1.0)),
    ("  graph replay (device time)", "withdraw and compact_kv_", "withdraw_cuda_graph_GBps", "{:.0f} GB/s", None),
    ("  graph: share of copy", "withdraw and compact_kv_", "withdraw_cuda_graph_of_copy", "{:.2f}", (">=", 0.7)),
    ("  graph: vs same-bytes copy", "withdraw and compact_kv_", "withdraw_cuda_graph_vs_same_bytes_copy", "{:.2f}x", None),
    ("withdraw triton", "withdraw and compact_kv_", "withdraw_triton_GBps", "{:.0f} GB/s", None),
    ("  share of copy", "withdraw and compact_kv_", "withdraw_triton_of_copy", "{:.2f}", None),
    ("  graph replay (device time)", "withdraw and compact_kv_", "withdraw_triton_graph_GBps", "{:.0f} GB/s", None),
    ("compact_kv_ cuda", "withdraw and compact_kv_", "compact_kv_cuda_GBps", "{:.0f} GB/s", None),
    ("  share of copy", "withdraw and compact_kv_", "compact_kv_cuda_of_copy", "{:.2f}", (">=", 0.7)),
    ("  graph replay (device time)", "withdraw and compact_kv_", "compact_kv_cuda_graph_GBps", "{:.0f} GB/s", None),
    ("compact_kv_ triton", "withdraw and compact_kv_", "compact_kv_triton_GBps", "{:.0f} GB/s", None),
    ("  graph replay (device time)", "withdraw and compact_kv_", "compact_kv_triton_graph_GBps", "{:.0f} GB/s", None),
    ("varlen SDPA (padded)", "attention", "varlen_sdpa_padded_TFLOPs", "{:.1f} TFLOP/s", None),
    ("varlen triton", "attention", "varlen_triton_TFLOPs", "{:.1f} TFLOP/s", None),
    ("  vs SDPA", "attention", "varlen_triton_vs_sdpa", "{:.2f}x", (">=", 1.0)),
    ("decode SDPA (masked)", "attention", "decode_sdpa_masked_GBps", "{:.0f} GB/s", None),
    ("decode triton", "attention", "decode_triton_GBps", "{:.0f} GB/s", None),
    ("  vs SDPA", "attention", "decode_triton_vs_sdpa", "{:.2f}x", (">=", 1.0)),
    ("7B prefill b8 speedup", "end to end", "b8_prefill_speedup", "{:.2f}x", None),
    ("  ideal (decoder FLOPs)", "end to end", "b8_prefill_ideal", "{:.2f}x", None),
    ("  measured / ideal", "end to end", "b8_prefill_ratio", "{:.2f}", (">=", 0.9)),
    ("7B decode b32 speedup", "end to end", "b32_decode_speedup", "{:.2f}x", (">=", 1.3)),
    ("7B deep KV cut b32", "end to end", "b32_kv_deep_cut", "{:.1%}", None),
    ("  visual share (deep)", "end to end", "b32_kv_visual_fraction_deep", "{:.1%}", None),
]


def _get(result: dict, sec: str, key: str):
    s = result.get("sections", {}).get(sec)
    if not s or not s.get("ok"):
        return None
    v = s.get("figures", {}).get(key)
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def format_summary(result: dict) -> str:
    lines = [f"stage {result.get('stage', '?')} summary ({result.get('env', {}).get('gpu') or result.get('env', {}).get('device', '?')})"]
    for name, s in result.get("sections", {}).items():
        state = "ok" if s.get("ok") else f"FAILED: {s.get('error', '?')}"
        lines.append(f"  section {name:28s} {s.get('seconds', float('nan')):7.1f} s  {state}")
    corr = _get(result, "correctness", "checks")
    if corr is not None:
        bad = [c for c in corr if not c["ok"]]
        lines.append(f"  correctness: {len(corr) - len(bad)} of {len(corr)} checks passed")
        for c in bad[:10]:
            lines.append(f"    FAIL {c['op']} {c['backend']} {c['case']}: {c['detail']}")
    if result.get("stage") == 1:
        lines.append(f"  {'figure':28s} {'value':>16s}  target")
        for label, sec, key, fmt, target in STAGE1:
            v = _get(result, sec, key)
            if v is None:
                val, verdict = "missing", ""
            else:
                val = fmt.format(v)
                verdict = ""
                if target is not None:
                    ok = v >= target[1]
                    verdict = f"{'met' if ok else 'NOT met'} ({target[0]} {target[1]})"
            lines.append(f"  {label:28s} {val:>16s}  {verdict}")
    for extra in result.get("lines", []):
        lines.append(f"  {extra}")
    return "\n".join(lines)


def _fmt(v, fmt: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "missing"
    return fmt.format(v)


def format_e2e(res: dict, name: str = "") -> str:
    """The rows of one `python -m vtw bench` JSON, with the end-to-end targets (prefill at batch 8
    >= 0.9 of the ideal decoder speedup; decode at batch 32 >= 1.3x; the deep-layer KV cut
    reaching the visual share) printed met / NOT met; an absent figure is "missing"."""
    lines = [f"  end to end {name or res.get('preset', '')}"]
    rows = res.get("rows") or []
    if not rows:
        return lines[0] + ": missing (no rows)"
    for r in rows:
        b = r.get("batch", "?")
        if "skipped" in r:
            lines.append(f"    batch {b:>3}: skipped ({r['skipped']})")
            continue
        kv = r.get("kv") or {}
        lines.append(f"    batch {b:>3}  K {r.get('K', '?')}  prefill {_fmt(r.get('prefill_speedup'), '{:.2f}x')} "
                     f"/ ideal {_fmt(r.get('ideal_decoder'), '{:.2f}x')} = {_fmt(r.get('ratio_decoder'), '{:.2f}')}"
                     f"  decode {_fmt(r.get('decode_speedup'), '{:.2f}x')}"
                     f"  deep KV cut {_fmt(kv.get('deep_cut'), '{:.1%}')} (visual {_fmt(kv.get('visual_fraction_deep'), '{:.1%}')})")
    by = {r.get("batch"): r for r in rows if "skipped" not in r}

    def verdict(ok, text):
        lines.append(f"    {'missing' if ok is None else 'met' if ok else 'NOT met':8s} {text}")

    r8, r32 = by.get(8), by.get(32)
    v = (r8 or {}).get("ratio_decoder")
    verdict(None if v is None else v >= 0.9, "prefill at batch 8 >= 0.9 of the ideal")
    v = (r32 or {}).get("decode_speedup")
    verdict(None if v is None else v >= 1.3, "decode at batch 32 >= 1.3x")
    kv = (r32 or {}).get("kv") or {}
    cut, vis = kv.get("deep_cut"), kv.get("visual_fraction_deep")
    verdict(None if cut is None or vis is None else cut >= vis - 0.005, "deep-layer KV cut >= the visual share")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    e2e = "--e2e" in argv
    paths = [a for a in argv if a != "--e2e"]
    try:
        res = json.load(open(paths[0]))
    except (OSError, ValueError, IndexError) as e:
        print(f"  gpu_summary: no readable JSON ({e})")
        return 0
    print(format_e2e(res, paths[0]) if e2e else format_summary(res))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
