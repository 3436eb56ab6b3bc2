"""Independent references for the data-moving ops, written from CONTRACT.md with plain Python
loops (not from vtw_kernels/reference.py, which is itself a backend under test), and helpers
shared by the test modules of withdraw and compact_kv_.

Every copy here is a tensor-to-tensor copy of the same dtype, which moves bytes: the expected
values carry NaN payloads, infinities and -0.0 exactly as the inputs do.
"""

from __future__ import annotations

import torch

# The dtypes of the data-moving ops (withdraw, compact_kv_); the attention ops take the first three.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INT_OF = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
           torch.float64: torch.int64}


def backends(op: str) -> list[str]:
    """The backends of `op` this file tests: those available here, minus Triton and CUDA
    (which have their own test files)."""
    import vtw_kernels

    return [b for b in vtw_kernels.available_backends(op) if b in ("torch", "cpu")]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's elements reinterpreted as integers of the same width, so that torch.equal
    compares bit patterns (NaN == NaN with the same payload, -0.0 != 0.0)."""
    if t.dtype in _INT_OF:
        return t.view(_INT_OF[t.dtype])
    return t


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if not torch.equal(bits(actual), bits(expected)):
        diff = (bits(actual) != bits(expected)).nonzero()
        raise AssertionError(f"{what}: {diff.shape[0]} elements differ bitwise, first at {diff[:5].tolist()}")


def random_bits(shape, dtype: torch.dtype, generator: torch.Generator | None = None) -> torch.Tensor:
    """A tensor of `dtype` filled with uniformly random bit patterns: normal numbers, subnormals,
    +-0, +-inf and NaNs with all sorts of payloads."""
    it = _INT_OF[dtype]
    info = torch.iinfo(it)
    return torch.randint(info.min, info.max, tuple(shape), dtype=it, generator=generator).view(dtype)


def special_values(shape, dtype: torch.dtype, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random normal values sprinkled with NaN (two payloads), +-inf and -0.0."""
    x = torch.randn(tuple(shape), generator=generator).to(dtype)
    flat = x.view(-1)
    n = flat.numel()
    if n:
        specials = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 0.0], dtype=dtype)
        pick = torch.randint(0, 4, (n,), generator=generator)
        which = torch.randint(0, specials.numel(), (n,), generator=generator)
        flat[pick == 0] = specials[which[pick == 0]]
        # NaNs with payloads other than the default quiet NaN, one of them signalling and negative
        width = torch.finfo(dtype).bits
        patterns = {torch.float32: (0x7FC00123, 0xFF800001), torch.float16: (0x7E01, 0xFC01),
                    torch.bfloat16: (0x7FC1, 0xFF81),
                    torch.float64: (0x7FF8000000000123, 0xFFF0000000000001)}[dtype]
        ib = flat.view(_INT_OF[dtype])
        for k, p in enumerate(patterns):
            ib[k::7] = p - (1 << width) if p >= 1 << (width - 1) else p
    return x


# ----------------------------------------------------------------------------------------------
# withdraw
# ----------------------------------------------------------------------------------------------

def ref_withdraw(hidden: torch.Tensor, visual_mask: torch.Tensor, num_keep: int | None = None,
                 pad_left: bool = False):
    """(out, keep_index, keep_lens) of CONTRACT.md, by loops over rows and tokens."""
    B, S, D = hidden.shape
    mask = visual_mask.tolist()
    kept = [[s for s in range(S) if not mask[b][s]] for b in range(B)]
    lens = [len(k) for k in kept]
    s_keep = max(lens, default=0) if num_keep is None else num_keep
    assert s_keep >= max(lens, default=0), "the reference is not asked to truncate"
    keep_index = [[-1] * s_keep for _ in range(B)]
    out = torch.zeros((B, s_keep, D), dtype=hidden.dtype)
    for b in range(B):
        first = s_keep - lens[b] if pad_left else 0
        for r, s in enumerate(kept[b]):
            keep_index[b][first + r] = s
            out[b, first + r] = hidden[b, s]  # a same-dtype copy: bit-exact
    return (out, torch.tensor(keep_index, dtype=torch.int64).reshape(B, s_keep),
            torch.tensor(lens, dtype=torch.int32).reshape(B))


def ref_withdraw_grad(hidden_shape, visual_mask: torch.Tensor, grad_out: torch.Tensor,
                      num_keep: int | None = None, pad_left: bool = False) -> torch.Tensor:
    """d(sum(out * grad_out))/d(hidden): grad_out of a kept token's slot at its position,
    zeros at withdrawn positions."""
    B, S, D = hidden_shape
    mask = visual_mask.tolist()
    grad = torch.zeros((B, S, D), dtype=grad_out.dtype)
    s_keep = grad_out.shape[1]
    for b in range(B):
        kept = [s for s in range(S) if not mask[b][s]]
        first = s_keep - len(kept) if pad_left else 0
        for r, s in enumerate(kept):
            grad[b, s] = grad_out[b, first + r]
    return grad


def assert_withdraw_equal(result, expected, what: str = "") -> None:
    out, keep_index, keep_lens = result
    e_out, e_index, e_lens = expected
    assert keep_lens.dtype == torch.int32 and keep_index.dtype == torch.int64, what
    assert torch.equal(keep_lens, e_lens), f"{what}: keep_lens {keep_lens.tolist()} != {e_lens.tolist()}"
    assert torch.equal(keep_index, e_index), f"{what}: keep_index {keep_index.tolist()} != {e_index.tolist()}"
    assert out.device == e_out.device
    assert_bits_equal(out, e_out, f"{what}: out")


# ----------------------------------------------------------------------------------------------
# compact_kv_
# ----------------------------------------------------------------------------------------------

def ref_new_lens(visual_mask: torch.Tensor) -> torch.Tensor:
    return torch.tensor([sum(1 for m in row if not m) for row in visual_mask.tolist()],
                        dtype=torch.int32).reshape(visual_mask.shape[0])


def ref_compact_into(tensors_before, tensors_expected, visual_mask: torch.Tensor) -> None:
    """Writes into `tensors_expected` (views of a copy of the memory) what compaction must leave
    in the slots it defines: for every tensor, row b and head h, slot r < new_lens[b] holds
    the r-th kept token of `tensors_before` (the same views of the untouched memory)."""
    mask = visual_mask.tolist()
    for before, expected in zip(tensors_before, tensors_expected):
        B, H = before.shape[:2]
        for b in range(B):
            kept = [s for s, m in enumerate(mask[b]) if not m]
            for h in range(H):
                for r, s in enumerate(kept):
                    expected[b, h, r] = before[b, h, s]


def check_compaction(buf_after: torch.Tensor, buf_before: torch.Tensor, views, visual_mask: torch.Tensor,
                     new_lens: torch.Tensor, what: str = "") -> None:
    """Checks a compaction done in place on `views(buf_after)` (a list of cache tensors that are
    views of `buf_after`), against `buf_before`, a copy of the memory taken before the call.

    Every byte of the buffer must be as expected: the first new_lens[b] slots of every
    tensor/row/head hold the kept tokens in order; positions >= S, the memory around the views
    and every other tensor are untouched. Only slots new_lens[b] .. S-1 of the views are free.
    """
    assert new_lens.dtype == torch.int32, f"{what}: new_lens dtype {new_lens.dtype}"
    e_lens = ref_new_lens(visual_mask)
    assert torch.equal(new_lens, e_lens), f"{what}: new_lens {new_lens.tolist()} != {e_lens.tolist()}"
    expected = buf_before.clone()
    exp_views, act_views = views(expected), views(buf_after)
    ref_compact_into(views(buf_before), exp_views, visual_mask)
    S = visual_mask.shape[1]
    # the unspecified slots: whatever the op left there is accepted
    for e, a in zip(exp_views, act_views):
        for b, n in enumerate(e_lens.tolist()):
            e[b, :, n:S] = a[b, :, n:S]
    assert_bits_equal(buf_after, expected, f"{what}: buffer after compaction")


# ----------------------------------------------------------------------------------------------
# cache tensors laid out in one byte buffer
# ----------------------------------------------------------------------------------------------

GUARD = 24  # bytes between two tensors of a buffer; a multiple of 8 keeps every view aligned


def _layout(flat, B, H, S_cap, Dh, layout):
    """(number of elements to allocate, or the view of `flat` when given)."""
    if layout == "contiguous":
        n = B * H * S_cap * Dh
        return n if flat is None else flat[:n].view(B, H, S_cap, Dh)
    if layout == "slice":  # a window of a larger cache: S_cap of S_cap + 3 slots, Dh of Dh + 2
        n = B * H * (S_cap + 3) * (Dh + 2)
        return n if flat is None else flat[:n].view(B, H, S_cap + 3, Dh + 2)[:, :, :S_cap, 1:Dh + 1]
    if layout == "bshd":  # tokens outermost, heads inside: [B, S_cap, H, Dh] seen as [B, H, S_cap, Dh]
        n = B * S_cap * H * Dh
        return n if flat is None else flat[:n].view(B, S_cap, H, Dh).transpose(1, 2)
    if layout == "every_other":  # strided in batch and heads
        n = 2 * B * (2 * H + 1) * S_cap * Dh
        return n if flat is None else flat[:n].view(2 * B, 2 * H + 1, S_cap, Dh)[::2, 1::2]
    raise AssertionError(layout)


class Caches:
    """Cache tensors (specs: dtype, Dh, layout per tensor; keys first) laid out in one byte
    buffer with guard bytes, so that views(buf) rebuilds the same views on any copy of it."""

    def __init__(self, B, H, S_cap, key_specs, value_specs, seed=0):
        self.B, self.H, self.S_cap = B, H, S_cap
        self.specs = list(key_specs) + list(value_specs)
        self.n_keys = len(key_specs)
        self.offsets, off = [], GUARD
        for dtype, Dh, layout in self.specs:
            self.offsets.append(off)
            nbytes = _layout(None, B, H, S_cap, Dh, layout) * torch.empty((), dtype=dtype).element_size()
            off += (nbytes + 7) // 8 * 8 + GUARD
        g = torch.Generator().manual_seed(seed)
        self.buf = random_bits((off // 2,), torch.float16, g).view(torch.uint8)  # off % 8 == 0

    def views(self, buf):
        out = []
        for (dtype, Dh, layout), off in zip(self.specs, self.offsets):
            esz = torch.empty((), dtype=dtype).element_size()
            n = _layout(None, self.B, self.H, self.S_cap, Dh, layout)
            out.append(_layout(buf[off:off + n * esz].view(dtype), self.B, self.H, self.S_cap, Dh, layout))
        return out

    def split(self, buf):
        v = self.views(buf)
        return v[: self.n_keys], v[self.n_keys:]


def make_mask(kind: str, B: int, S: int, g: torch.Generator) -> torch.Tensor:
    """Visual masks of the shapes the tests need: random, all visual, none visual, rows of each
    kind mixed, one span per row at a different offset (as in LLaVA prompts), non-contiguous."""
    if kind == "random":
        return torch.rand(B, S, generator=g) < 0.5
    if kind == "all_visual":
        return torch.ones(B, S, dtype=torch.bool)
    if kind == "no_visual":
        return torch.zeros(B, S, dtype=torch.bool)
    if kind == "mixed_rows":  # rows all visual, rows without visual tokens, random rows
        m = torch.rand(B, S, generator=g) < torch.rand(B, 1, generator=g)
        m[0] = True
        if B > 1:
            m[1] = False
        return m
    if kind == "span":  # one image per row at a different offset
        m = torch.zeros(B, S, dtype=torch.bool)
        for b in range(B):
            m[b, 1 + b: max(1 + b, S - 2 - b)] = True
        return m
    if kind == "strided":  # a non-contiguous mask
        return (torch.rand(2 * B, 3 * S + 1, generator=g) < 0.5)[::2, 1::3][:, :S]
    raise AssertionError(kind)


def run_triton_aot(script: str, tmp_path, *args: str, timeout: int = 900):
    """Starts `script` (Python source) in a fresh interpreter for an ahead-of-time Triton
    compile: without TRITON_INTERPRET (under the interpreter, @triton.jit gives functions the
    compiler cannot lower) and with an empty Triton cache of its own (TRITON_CACHE_DIR in
    `tmp_path`), so that no earlier compile, on this machine or in ~/.triton, answers for it.
    Returns the Popen; read it with .communicate()."""
    import os
    import subprocess
    import sys

    cache = tmp_path / f"triton-cache-{len(list(tmp_path.glob('triton-cache-*')))}"
    cache.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache)
    return subprocess.Popen([sys.executable, "-c", script, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
