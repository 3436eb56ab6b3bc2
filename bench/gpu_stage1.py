"""Stage 1 of bench/gpu_check.sh: the most valuable figures of a lent GPU, in a few minutes.

1. Correctness: every op on every fast backend of the device (cuda, triton) against the torch
   reference on the same device, on fresh random data (a focused subset of shapes: odd sizes,
   LLaVA-1.5 shapes, bf16/fp16/fp32); outputs poisoned first, so an unwritten element fails.
2. Ceilings and headline figures: device copy bandwidth (torch.clone of 1 GiB, read + write),
   withdraw and compact_kv_ GB/s against it (and against boolean indexing); varlen and decode
   attention TFLOP/s against torch SDPA on the padded equivalent; end to end on the
   LLaVA-1.5-7B shape (random weights, bf16): prefill at batch 8 and decode at batch 32 with
   and without withdrawal, beside the ideal speedup (python -m vtw bench's code).

Each section records into one JSON (written after every section, so a run cut short keeps
what it measured), and a section that fails is recorded as failed with its error, never a
crash of the whole stage. The last thing printed is a summary table; a figure that is missing
says "missing".

    python bench/gpu_stage1.py --out DIR            (on a GPU; DIR/stage1.json)
    python bench/gpu_stage1.py --smoke --device cpu (tiny shapes, any machine: checks the script)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "bench") not in sys.path:
    sys.path.insert(0, str(ROOT / "bench"))

from gpu_summary import format_summary  # noqa: E402

RESULT: dict = {"stage": 1, "sections": {}}
TIMING = {"inner": 10, "rounds": 15}  # --smoke: one call


def _save(out: Path | None) -> None:
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "stage1.json").write_text(json.dumps(RESULT, indent=1, default=str))


def section(name: str, out: Path | None):
    """Decorator: run the section, record its figures or its error, save the JSON."""

    def wrap(fn):
        def run(*a, **k):
            t0 = time.perf_counter()
            print(f"\n== {name}", flush=True)
            try:
                figures = fn(*a, **k)
                RESULT["sections"][name] = {"ok": True, "figures": figures, "seconds": time.perf_counter() - t0}
            except Exception as e:  # recorded, the next section still runs
                traceback.print_exc()
                RESULT["sections"][name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:500],
                                            "seconds": time.perf_counter() - t0}
            _save(out)
            return RESULT["sections"][name]

        return run

    return wrap


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_median(fn, dev, *, inner: int | None = None, rounds: int | None = None) -> float:
    """Median seconds per call: rounds of `inner` back-to-back calls, synchronised."""
    inner = min(inner or TIMING["inner"], TIMING["inner"])
    rounds = min(rounds or TIMING["rounds"], TIMING["rounds"])
    fn()
    sync(dev)
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync(dev)
        ts.append((time.perf_counter() - t0) / inner)
    return statistics.median(ts)


def time_graph(fn, dev, *, calls: int = 20, replays: int | None = None) -> float:
    """Median seconds per call of `fn` replayed from a CUDA graph of `calls` back-to-back calls:
    the device's time, without the Python and launch overhead of each call (which, at the
    LLaVA shapes' tens of microseconds per op, is what eager timing measures). Raises if `fn`
    cannot be captured (a host synchronisation, a pageable copy)."""
    replays = min(replays or TIMING["rounds"], TIMING["rounds"])
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(dev).wait_stream(side)
    sync(dev)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    sync(dev)
    ts = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3 / calls)
    return statistics.median(ts)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return math.inf
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------------------
# 1. correctness


def visual_mask(B, S, dev, g, spans=True):
    """Each row: a random contiguous visual span (the LLaVA layout) or random scattered tokens."""
    m = torch.zeros(B, S, dtype=torch.bool)
    for b in range(B):
        if spans:
            lo = int(torch.randint(0, max(1, S // 3), (1,), generator=g))
            hi = lo + int(torch.randint(0, S - lo + 1, (1,), generator=g))
            m[b, lo:hi] = True
        else:
            m[b] = torch.rand(S, generator=g) < 0.6
    return m.to(dev)


def check_ops(dev, backends, shapes, g):
    import vtw_kernels as vk

    rows = []

    def record(op, backend, case, ok, detail):
        rows.append({"op": op, "backend": backend, "case": case, "ok": bool(ok), "detail": detail})
        print(f"  {'ok  ' if ok else 'FAIL'} {op:17s} {backend:7s} {case:34s} {detail}", flush=True)

    for (B, S, D, dtype) in shapes["withdraw"]:
        hidden = torch.randn(B, S, D, generator=g).to(dev, dtype)
        for spans in (True, False):
            m = visual_mask(B, S, dev, g, spans)
            ref = vk.withdraw(hidden, m, backend="torch")
            for be in backends("withdraw"):
                try:
                    got = vk.withdraw(hidden, m, backend=be)
                    nk = int(ref.keep_lens.max()) if B else 0
                    got2 = vk.withdraw(hidden, m, num_keep=nk + 3, backend=be)
                    ok = (torch.equal(got.out, ref.out) and torch.equal(got.keep_index, ref.keep_index)
                          and torch.equal(got.keep_lens, ref.keep_lens)
                          and torch.equal(got2.out[:, :nk], ref.out) and bool((got2.out[:, nk:] == 0).all())
                          and bool((got2.keep_index[:, nk:] == -1).all()))
                    record("withdraw", be, f"{B}x{S}x{D} {str(dtype)[6:]} {'span' if spans else 'scatter'}",
                           ok, "bit-exact" if ok else "MISMATCH")
                except Exception as e:
                    record("withdraw", be, f"{B}x{S}x{D}", False, f"{type(e).__name__}: {e}"[:120])

    for (L, B, H, S, S_cap, Dh, dtype) in shapes["compact_kv_"]:
        m = visual_mask(B, S, dev, g)
        base_k = [torch.randn(B, H, S_cap, Dh, generator=g).to(dev, dtype) for _ in range(L)]
        base_v = [torch.randn(B, H, S_cap, Dh + 16, generator=g).to(dev, dtype) for _ in range(L)]
        rk, rv = [t.clone() for t in base_k], [t.clone() for t in base_v]
        ref_lens = vk.compact_kv_(rk, rv, m, backend="torch")
        for be in backends("compact_kv_"):
            try:
                ks, vs = [t.clone() for t in base_k], [t.clone() for t in base_v]
                lens = vk.compact_kv_(ks, vs, m, backend=be)
                ok = torch.equal(lens, ref_lens)
                for a, r, orig in zip(ks + vs, rk + rv, base_k + base_v):
                    for b in range(B):
                        n = int(ref_lens[b])
                        ok &= torch.equal(a[b, :, :n], r[b, :, :n]) and torch.equal(a[b, :, S:], orig[b, :, S:])
                record("compact_kv_", be, f"{L}L {B}x{H}x{S}/{S_cap}x{Dh} {str(dtype)[6:]}", ok,
                       "bit-exact" if ok else "MISMATCH")
            except Exception as e:
                record("compact_kv_", be, f"{L}L {B}x{H}x{S}", False, f"{type(e).__name__}: {e}"[:120])

    for (lens_q, lens_k, hq, hkv, d, dtype, causal) in shapes["varlen_attention"]:
        cq = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32, device=dev)
        ck = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32, device=dev)
        q = torch.randn(sum(lens_q), hq, d, generator=g).to(dev, dtype)
        k = torch.randn(sum(lens_k), hkv, d, generator=g).to(dev, dtype)
        v = torch.randn(sum(lens_k), hkv, d, generator=g).to(dev, dtype)
        # the reference in float32 on upcast inputs (the torch backend takes no float64)
        ref = vk.varlen_attention(q.float(), k.float(), v.float(), cq, ck, max(lens_q), max(lens_k),
                                  causal=causal, backend="torch")
        tol = 2e-2 if dtype == torch.bfloat16 else 5e-3 if dtype == torch.float16 else 1e-3
        for be in backends("varlen_attention"):
            try:
                got = vk.varlen_attention(q, k, v, cq, ck, max(lens_q), max(lens_k), causal=causal, backend=be)
                e = rel_err(got, ref)
                record("varlen_attention", be, f"B{len(lens_q)} h{hq}/{hkv} d{d} {str(dtype)[6:]} c{int(causal)}",
                       e < tol, f"rel err {e:.1e} (< {tol:.0e})")
            except Exception as e:
                record("varlen_attention", be, f"d{d}", False, f"{type(e).__name__}: {e}"[:120])

    for (B, hq, hkv, S_cap, d, dtype) in shapes["decode_attention"]:
        q = torch.randn(B, hq, d, generator=g).to(dev, dtype)
        kc = torch.randn(B, hkv, S_cap, d, generator=g).to(dev, dtype)
        vc = torch.randn(B, hkv, S_cap, d, generator=g).to(dev, dtype)
        lens = torch.randint(1, S_cap + 1, (B,), generator=g).to(dev, torch.int32)
        ref = vk.decode_attention(q.float(), kc.float(), vc.float(), lens, backend="torch")
        tol = 2e-2 if dtype == torch.bfloat16 else 5e-3 if dtype == torch.float16 else 1e-3
        for be in backends("decode_attention"):
            try:
                got = vk.decode_attention(q, kc, vc, lens, backend=be)
                e = rel_err(got, ref)
                record("decode_attention", be, f"B{B} h{hq}/{hkv} cap{S_cap} d{d} {str(dtype)[6:]}",
                       e < tol, f"rel err {e:.1e} (< {tol:.0e})")
            except Exception as e:
                record("decode_attention", be, f"d{d}", False, f"{type(e).__name__}: {e}"[:120])
    return {"checks": rows, "passed": sum(r["ok"] for r in rows), "failed": sum(not r["ok"] for r in rows)}


# ----------------------------------------------------------------------------------------
# 2. ceilings and headline figures


def copy_bandwidth(dev, nbytes):
    x = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    x.random_(0, 255)
    t = time_median(lambda: x.clone(), dev, inner=3, rounds=10)
    return {"copy_GBps": 2 * nbytes / t / 1e9, "bytes": nbytes}


def data_ops(dev, backends, sh, copy_gbps, g):
    import vtw_kernels as vk

    B, S, sys_t, img, D = sh["B"], sh["S"], sh["sys"], sh["img"], sh["D"]
    hidden = torch.randn(B, S, D, generator=g).to(dev, torch.bfloat16)
    m = torch.zeros(B, S, dtype=torch.bool)
    m[:, sys_t:sys_t + img] = True
    m = m.to(dev)
    keep = S - img
    wbytes = 2 * B * keep * D * 2 + B * S  # read kept rows + write them (bf16) + the mask
    fig = {"withdraw_shape": f"B{B} S{S} D{D} bf16 ({img} visual)", "copy_GBps": copy_gbps}
    t_idx = time_median(lambda: hidden[~m].view(B, keep, D), dev)
    fig["withdraw_bool_index_GBps"] = wbytes / t_idx / 1e9
    graphs = dev.type == "cuda"
    if graphs:  # the ceiling at this size: a plain copy of the kept rows' bytes, device time
        kept = torch.randn(B, keep, D, generator=g).to(dev, torch.bfloat16)
        t_copy = time_graph(lambda: kept.clone(), dev)
        fig["copy_same_bytes_graph_GBps"] = wbytes / t_copy / 1e9
    for be in backends("withdraw"):
        t = time_median(lambda: vk.withdraw(hidden, m, num_keep=keep, backend=be), dev)
        fig[f"withdraw_{be}_GBps"] = wbytes / t / 1e9
        fig[f"withdraw_{be}_of_copy"] = wbytes / t / 1e9 / copy_gbps
        fig[f"withdraw_{be}_vs_bool_index"] = t_idx / t
        if graphs:
            try:
                tg = time_graph(lambda: vk.withdraw(hidden, m, num_keep=keep, backend=be), dev)
                fig[f"withdraw_{be}_graph_GBps"] = wbytes / tg / 1e9
                fig[f"withdraw_{be}_graph_of_copy"] = wbytes / tg / 1e9 / copy_gbps
                fig[f"withdraw_{be}_graph_vs_same_bytes_copy"] = t_copy / tg
            except Exception as e:  # recorded: an op that cannot be captured is a finding
                fig[f"withdraw_{be}_graph_error"] = f"{type(e).__name__}: {e}"[:200]
    L, H, Dh = sh["layers"], sh["heads"], sh["head_dim"]
    ks = [torch.randn(B, H, S, Dh, generator=g).to(dev, torch.bfloat16) for _ in range(L)]
    vs = [torch.randn(B, H, S, Dh, generator=g).to(dev, torch.bfloat16) for _ in range(L)]
    cbytes = 2 * L * 2 * B * H * keep * Dh * 2 + B * S
    fig["compact_shape"] = f"{L} layers x (K, V) [B{B}, H{H}, S{S}, {Dh}] bf16"
    for be in backends("compact_kv_"):
        # The kept tokens move to the front; after the first call the data is already
        # compacted, which moves the same bytes (the op does not know), so timing repeats is fair.
        t = time_median(lambda: vk.compact_kv_(ks, vs, m, backend=be), dev, inner=3, rounds=10)
        fig[f"compact_kv_{be}_GBps"] = cbytes / t / 1e9
        fig[f"compact_kv_{be}_of_copy"] = cbytes / t / 1e9 / copy_gbps
        if graphs:
            try:
                tg = time_graph(lambda: vk.compact_kv_(ks, vs, m, backend=be), dev, calls=5)
                fig[f"compact_kv_{be}_graph_GBps"] = cbytes / tg / 1e9
                fig[f"compact_kv_{be}_graph_of_copy"] = cbytes / tg / 1e9 / copy_gbps
            except Exception as e:
                fig[f"compact_kv_{be}_graph_error"] = f"{type(e).__name__}: {e}"[:200]
    return fig


def attention(dev, backends, sh, g):
    import torch.nn.functional as F

    import vtw_kernels as vk

    hq, hkv, d = sh["heads"], sh["heads"], sh["head_dim"]
    lens = sh["varlen_lens"]
    B = len(lens)
    dt = torch.bfloat16
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=dev)
    q = torch.randn(sum(lens), hq, d, generator=g).to(dev, dt)
    k = torch.randn(sum(lens), hkv, d, generator=g).to(dev, dt)
    v = torch.randn(sum(lens), hkv, d, generator=g).to(dev, dt)
    flops = sum(2 * n * n * hq * d for n in lens)  # 4 b s^2 h d, halved when causal
    Smax = max(lens)
    qp = torch.zeros(B, hq, Smax, d, device=dev, dtype=dt)
    kp, vp = torch.zeros_like(qp), torch.zeros_like(qp)
    off = 0
    for b, n in enumerate(lens):
        qp[b, :, :n] = q[off:off + n].transpose(0, 1)
        kp[b, :, :n] = k[off:off + n].transpose(0, 1)
        vp[b, :, :n] = v[off:off + n].transpose(0, 1)
        off += n
    fig = {"varlen_shape": f"B{B} lengths {min(lens)}-{max(lens)} h{hq} d{d} bf16 causal"}
    t_sdpa = time_median(lambda: F.scaled_dot_product_attention(qp, kp, vp, is_causal=True), dev)
    fig["varlen_sdpa_padded_TFLOPs"] = flops / t_sdpa / 1e12
    for be in backends("varlen_attention"):
        t = time_median(lambda: vk.varlen_attention(q, k, v, cu, cu, Smax, Smax, backend=be), dev)
        fig[f"varlen_{be}_TFLOPs"] = flops / t / 1e12
        fig[f"varlen_{be}_vs_sdpa"] = t_sdpa / t
    Bd, cap = sh["decode_batch"], sh["decode_cap"]
    qd = torch.randn(Bd, hq, d, generator=g).to(dev, dt)
    kc = torch.randn(Bd, hkv, cap, d, generator=g).to(dev, dt)
    vc = torch.randn(Bd, hkv, cap, d, generator=g).to(dev, dt)
    cl = torch.randint(cap // 8, cap + 1, (Bd,), generator=g).to(dev, torch.int32)
    mask = torch.arange(cap, device=dev)[None, :] < cl[:, None]
    dbytes = int(cl.sum()) * hkv * d * 2 * 2 + 2 * Bd * hq * d * 2
    fig["decode_shape"] = f"B{Bd} cache {cap} (ragged lengths) h{hq} d{d} bf16"
    t_sdpa = time_median(lambda: F.scaled_dot_product_attention(qd[:, :, None], kc, vc,
                                                                attn_mask=mask[:, None, None, :]), dev)
    fig["decode_sdpa_masked_GBps"] = dbytes / t_sdpa / 1e9
    for be in backends("decode_attention"):
        t = time_median(lambda: vk.decode_attention(qd, kc, vc, cl, backend=be), dev)
        fig[f"decode_{be}_GBps"] = dbytes / t / 1e9
        fig[f"decode_{be}_vs_sdpa"] = t_sdpa / t
    return fig


def end_to_end(dev, preset, batches, new_tokens, repeats, out):
    from vtw import bench

    cfg = bench.BenchConfig(preset=preset, batches=tuple(batches), device=str(dev), dtype="auto",
                            repeats=repeats, warmup=1, new_tokens=new_tokens,
                            out=str(out / f"e2e-{preset}") if out else None)
    res = bench.run_bench(cfg)
    fig = {"preset": preset}
    for r in res.get("rows", []):
        b = r.get("batch")
        if "skipped" in r:
            fig[f"b{b}_skipped"] = r["skipped"]
            continue
        fig[f"b{b}_K"] = r.get("K")
        fig[f"b{b}_prefill_speedup"] = r.get("prefill_speedup")
        fig[f"b{b}_prefill_ideal"] = r.get("ideal_decoder")
        fig[f"b{b}_prefill_ratio"] = r.get("ratio_decoder")
        fig[f"b{b}_decode_speedup"] = r.get("decode_speedup")
        kv = r.get("kv", {})
        fig[f"b{b}_kv_deep_cut"] = kv.get("deep_cut")
        fig[f"b{b}_kv_visual_fraction_deep"] = kv.get("visual_fraction_deep")
    return fig


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=os.environ.get("OUT") or None)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (checks the script, any device)")
    ap.add_argument("--skip-e2e", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out) if args.out else None
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(int(time.time()))  # fresh random data every run

    import vtw_kernels as vk

    def backends(op):
        mine = ("cuda", "triton") if dev.type == "cuda" else ("cpu", "triton")
        return [b for b in vk.available_backends(op) if b in mine]

    RESULT["env"] = {"torch": torch.__version__, "device": str(dev), "cuda": torch.version.cuda,
                     "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
                     "build": vk.build_hint(), "smoke": args.smoke,
                     "backends": {op: backends(op) for op in
                                  ("withdraw", "compact_kv_", "varlen_attention", "decode_attention")}}
    try:
        import triton

        RESULT["env"]["triton"] = triton.__version__
    except ImportError:
        RESULT["env"]["triton"] = None
    print(json.dumps(RESULT["env"], indent=1))
    _save(out)

    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    if args.smoke:
        TIMING.update(inner=1, rounds=1)
        shapes = {"withdraw": [(2, 13, 24, f32), (0, 5, 8, f32)],
                  "compact_kv_": [(2, 2, 2, 9, 11, 8, f32)],
                  "varlen_attention": [([3, 1], [5, 2], 2, 1, 64, f32, True)],
                  "decode_attention": [(2, 2, 1, 9, 64, f32)]}
        sh = {"B": 2, "S": 20, "sys": 3, "img": 12, "D": 32, "layers": 2, "heads": 2, "head_dim": 64,
              "varlen_lens": [5, 9], "decode_batch": 2, "decode_cap": 16}
        copy_bytes = 2**20
    else:
        shapes = {"withdraw": [(5, 123, 123, f32), (3, 671, 4096, bf16), (8, 671, 4096, f16), (1, 1, 8, bf16),
                               (0, 7, 64, bf16)],
                  "compact_kv_": [(3, 5, 7, 123, 130, 128, bf16), (32, 2, 32, 671, 700, 128, bf16),
                                  (2, 3, 4, 50, 64, 64, f32)],
                  "varlen_attention": [([37, 1, 95, 200], [37, 1, 95, 200], 32, 8, 128, bf16, True),
                                       ([5, 60], [671, 671], 32, 32, 128, f16, True),
                                       ([33, 17], [33, 17], 8, 8, 96, f32, True),
                                       ([64, 129], [64, 129], 4, 4, 256, bf16, False)],
                  "decode_attention": [(32, 32, 32, 700, 128, bf16), (5, 8, 2, 1000, 64, f16),
                                       (3, 4, 4, 4096, 256, f32)]}
        sh = {"B": 32, "S": 671, "sys": 35, "img": 576, "D": 4096, "layers": 16, "heads": 32, "head_dim": 128,
              "varlen_lens": [60 + 37 * i % 140 for i in range(32)], "decode_batch": 32, "decode_cap": 2048}
        copy_bytes = 2**30

    section("correctness", out)(check_ops)(dev, backends, shapes, g)
    cb = section("copy bandwidth", out)(copy_bandwidth)(dev, copy_bytes)
    copy_gbps = cb.get("figures", {}).get("copy_GBps", float("nan"))
    section("withdraw and compact_kv_", out)(data_ops)(dev, backends, sh, copy_gbps, g)
    section("attention", out)(attention)(dev, backends, sh, g)
    if not args.skip_e2e:
        if args.smoke:
            section("end to end", out)(end_to_end)(dev, "tiny", [2], 2, 1, out)
        else:
            section("end to end", out)(end_to_end)(dev, "llava-1.5-7b", [8, 32], 16, 3, out)
    _save(out)
    print()
    print(format_summary(RESULT))
    failed = [n for n, s in RESULT["sections"].items() if not s["ok"]]
    bad = RESULT["sections"].get("correctness", {}).get("figures", {}).get("failed", 0)
    return 1 if failed or bad else 0


if __name__ == "__main__":
    sys.exit(main())
