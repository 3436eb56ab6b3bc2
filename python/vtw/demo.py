"""`python -m vtw demo`: withdraw the visual tokens from a small batch and show what went in and
what came out, on every backend this installation has.

(The full demo, which calibrates K on the embedded model and compares accuracy, time and
memory with and without withdrawal, arrives with the calibration issue.)
"""

from __future__ import annotations

import time

import torch

import vtw_kernels

SEGMENT_CHARS = {0: "t", 1: "V", 2: "p"}  # text, visual, padding


def _layout(kinds_row: torch.Tensor) -> str:
    """A run-length picture of a row: 2p 5t 8V 3t means 2 pad tokens, 5 text, 8 visual, 3 text."""
    out, prev, n = [], None, 0
    for v in kinds_row.tolist():
        if v == prev:
            n += 1
            continue
        if prev is not None:
            out.append(f"{n}{SEGMENT_CHARS[prev]}")
        prev, n = v, 1
    if prev is not None:
        out.append(f"{n}{SEGMENT_CHARS[prev]}")
    return " ".join(out) or "(empty)"


def make_batch(hidden_size: int = 64, seed: int = 0):
    """Four prompts as a multimodal LLM sees them after its vision tower: a system prompt, image
    tokens, a question; different image counts and places, one prompt with no image. Rows are
    left-padded to one length; padding is withdrawn with the visual tokens (no one attends to it).
    Returns hidden [B, S, D], the withdrawal mask [B, S] and the token kinds (0 text, 1 visual, 2 pad)."""
    g = torch.Generator().manual_seed(seed)
    rows = [
        [(5, False), (12, True), (6, False)],                              # one image
        [(4, False), (6, True), (3, False), (6, True), (4, False)],        # two images, interleaved
        [(9, False)],                                                       # text only
        [(3, False), (16, True), (2, False)],                               # one bigger image
    ]
    S = max(sum(n for n, _ in r) for r in rows)
    kinds = torch.full((len(rows), S), 2, dtype=torch.long)
    for b, segs in enumerate(rows):
        pos = S - sum(n for n, _ in segs)
        for n, visual in segs:
            kinds[b, pos:pos + n] = int(visual)
            pos += n
    hidden = torch.randn(len(rows), S, hidden_size, generator=g)
    return hidden, kinds != 0, kinds


def run(hidden_size: int = 64) -> int:
    hidden, mask, kinds = make_batch(hidden_size)
    B, S, D = hidden.shape
    print(f"vtw demo: Visual Tokens Withdrawal on a batch of {B} prompts, S = {S} tokens, hidden {D}")
    print(f"  {vtw_kernels.build_hint()}")
    print(f"  backends for withdraw: {vtw_kernels.available_backends('withdraw')}\n")
    print("what went in (t = text token, V = visual token, p = left padding; V and p are withdrawn):")
    for b in range(B):
        print(f"  row {b}: {_layout(kinds[b])}")

    ref = vtw_kernels.withdraw(hidden, mask, backend="torch")
    print("\nwhat came out (vtw_kernels.withdraw, default backend):")
    res = vtw_kernels.withdraw(hidden, mask)
    print(f"  out {list(res.out.shape)}  keep_index {list(res.keep_index.shape)}  keep_lens {res.keep_lens.tolist()}")
    for b in range(B):
        idx = res.keep_index[b].tolist()
        print(f"  row {b}: keeps {res.keep_lens[b].item():2d} tokens at positions {idx}")
    cut = 1 - res.keep_lens.sum().item() / (B * S)
    print(f"\n  {cut:.0%} of the batch's tokens withdrawn; every layer from K on runs on "
          f"{res.out.shape[1]} instead of {S} positions.")

    print("\nchecks against the pure-PyTorch reference (bit-exact), and time per call:")
    ok = True
    for backend in vtw_kernels.available_backends("withdraw"):
        if backend in ("cuda",) or (backend == "triton" and not torch.cuda.is_available()):
            continue  # the demo runs on CPU tensors
        got = vtw_kernels.withdraw(hidden, mask, backend=backend)
        same = all(torch.equal(x, y) for x, y in zip(got, ref))
        t0 = time.perf_counter()
        for _ in range(20):
            vtw_kernels.withdraw(hidden, mask, backend=backend)
        dt = (time.perf_counter() - t0) / 20
        ok &= same
        print(f"  {backend:6s}: {'exact' if same else 'MISMATCH'}  {dt * 1e6:8.1f} us")
    left = vtw_kernels.withdraw(hidden, mask, num_keep=S, pad_left=True)
    print(f"\n  with num_keep={S}, pad_left=True (no host sync on GPU): out {list(left.out.shape)}, "
          f"row 3 index {left.keep_index[3].tolist()}")
    return 0 if ok else 1
