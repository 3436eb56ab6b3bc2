"""Tile sweep of the Triton varlen attention kernel on a GPU (one device call, about a minute).

For each shape (equal and ragged lengths, bf16, h32, d128, causal and not) and each
(BLOCK_M, BLOCK_N, num_warps, num_stages), the median device time (triton.testing.do_bench)
next to torch SDPA (FlashAttention) on the padded batch, and the output's error against SDPA's
on the same data (a config that computes something else is reported, never picked).
The chosen entries go to vtw_kernels/triton/attention.py's varlen_config, where
tests/test_attention.py checks ahead of time that each compiles for sm_90a without spills.

    python bench/gpu_tune_varlen.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

CONFIGS = [(128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 2), (64, 64, 4, 3),
           (128, 32, 4, 2), (64, 128, 8, 2), (128, 64, 4, 3)]
SHAPES = {"equal 32x256": [256] * 32, "equal 8x1024": [1024] * 8,
          "ragged 32x60..195": [60 + 37 * i % 140 for i in range(32)],
          "ragged 64x20..300": [20 + (97 * i) % 281 for i in range(64)]}


def main() -> int:
    import triton
    from triton.testing import do_bench

    from vtw_kernels.triton import attention as ta

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()
    dev, dt, H, D = torch.device("cuda"), torch.bfloat16, 32, 128
    g = torch.Generator(device=dev).manual_seed(1)
    rows = []
    for name, lens in SHAPES.items():
        B, T, Smax = len(lens), sum(lens), max(lens)
        q, k, v = (torch.randn(T, H, D, device=dev, dtype=dt, generator=g) for _ in range(3))
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=dev)
        pads = []
        for t in (q, k, v):
            p = torch.zeros(B, H, Smax, D, device=dev, dtype=dt)
            for b, n in enumerate(lens):
                p[b, :, :n] = t[int(cu[b]):int(cu[b]) + n].transpose(0, 1)
            pads.append(p)
        for causal in (True, False):
            flops = sum((2 if causal else 4) * n * n * H * D for n in lens)
            ref = F.scaled_dot_product_attention(*pads, is_causal=causal)
            ref_packed = torch.cat([ref[b, :, :n].transpose(0, 1) for b, n in enumerate(lens)])
            t_sdpa = do_bench(lambda: F.scaled_dot_product_attention(*pads, is_causal=causal),
                              warmup=25, rep=100, return_mode="median")
            default = ta.varlen_config(dt, 128)
            for cfg in CONFIGS:
                bm, bn, w, s = cfg
                orig = ta.varlen_config
                ta.varlen_config = lambda dtype, block_d, _c=cfg: _c
                try:
                    fn = lambda: ta.varlen_attention(q, k, v, cu, cu, Smax, Smax, causal=causal)  # noqa: E731
                    out = fn()
                    err = float((out.double() - ref_packed.double()).norm() / ref_packed.double().norm())
                    t = do_bench(fn, warmup=25, rep=100, return_mode="median")
                    row = dict(shape=name, causal=causal, config=cfg, default=cfg == default, ms=t,
                               tflops=flops / t / 1e9, vs_sdpa=t_sdpa / t, err=err, sdpa_ms=t_sdpa)
                except Exception as e:  # out of resources etc.
                    row = dict(shape=name, causal=causal, config=cfg, error=f"{type(e).__name__}: {e}"[:120])
                finally:
                    ta.varlen_config = orig
                rows.append(row)
                if "error" in row:
                    print(f"{name:20s} c{int(causal)} {cfg}  ERROR {row['error']}", flush=True)
                else:
                    print(f"{name:20s} c{int(causal)} {str(cfg):18s}{'*' if row['default'] else ' '} {t * 1e3:8.1f} us"
                          f"  {row['tflops']:6.1f} TFLOP/s  vs SDPA {row['vs_sdpa']:.2f}x  err {err:.1e}", flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "tune_varlen.json").write_text(json.dumps(rows, indent=1))
    # per config: geometric mean of vs_sdpa over every shape
    import math

    print("\nconfig               geomean vs SDPA (all shapes)   worst")
    for cfg in CONFIGS:
        r = [x["vs_sdpa"] for x in rows if x["config"] == cfg and "vs_sdpa" in x and x["err"] < 2e-2]
        if r:
            print(f"{str(cfg):20s} {math.exp(sum(map(math.log, r)) / len(r)):.3f}x ({len(r)} cases)        {min(r):.2f}x")
    print("triton", triton.__version__)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
