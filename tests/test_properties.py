"""Property tests (hypothesis) of withdraw and compact_kv_ on the "torch" and "cpu" backends:
random shapes (empty ones included), masks of every density, num_keep >= max, pad_left,
dtypes, strided inputs, random bit patterns. Each backend must equal the loop references of
tests/_refs.py bit for bit, and the two ops must agree with each other.

The conftest "ci" profile runs 200 examples per property (HYPOTHESIS_PROFILE=dev: 25).
"""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

import vtw_kernels
from _refs import (
    FLOAT_DTYPES,
    Caches,
    assert_bits_equal,
    assert_withdraw_equal,
    backends,
    bits,
    check_compaction,
    random_bits,
    ref_new_lens,
    ref_withdraw,
)

W_BACKENDS = backends("withdraw")
C_BACKENDS = backends("compact_kv_")
LAYOUTS = ("contiguous", "slice", "bshd", "every_other")

dtypes = st.sampled_from(FLOAT_DTYPES)
seeds = st.integers(0, 2**31 - 1)
# the probability of a token being visual: the extremes (none, all) as often as the middle
densities = st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0), st.sampled_from([0.05, 0.95]))


def _mask(B, S, density, g):
    return torch.rand(B, S, generator=g) < density


@given(B=st.integers(0, 5), S=st.integers(0, 24), D=st.integers(0, 6), density=densities, dtype=dtypes,
       pad_left=st.booleans(), extra=st.one_of(st.none(), st.integers(0, 3)), strided=st.booleans(), seed=seeds)
def test_withdraw_equals_reference(B, S, D, density, dtype, pad_left, extra, strided, seed):
    g = torch.Generator().manual_seed(seed)
    if strided:  # strided in batch and sequence, last dimension a window of a wider one
        hidden = random_bits((2 * B, 3 * S, D + 2), dtype, g)[::2, 1::3, 1:D + 1]
    else:
        hidden = random_bits((B, S, D), dtype, g)
    mask = _mask(B, S, density, g)
    max_kept = int((~mask).sum(1).max()) if B else 0
    num_keep = None if extra is None else max_kept + extra
    expected = ref_withdraw(hidden, mask, num_keep, pad_left)
    for backend in W_BACKENDS:
        res = vtw_kernels.withdraw(hidden, mask, num_keep=num_keep, pad_left=pad_left, backend=backend)
        assert_withdraw_equal(res, expected, backend)


@given(B=st.integers(0, 4), S=st.integers(0, 20), D=st.integers(1, 5), density=densities, dtype=dtypes,
       extra=st.integers(0, 4), seed=seeds)
def test_withdraw_padding_properties(B, S, D, density, dtype, extra, seed):
    # Relations between the outputs of one backend, with no reference involved:
    # num_keep only adds padding; pad_left only moves each row's kept tokens to the right end.
    g = torch.Generator().manual_seed(seed)
    hidden = random_bits((B, S, D), dtype, g)
    mask = _mask(B, S, density, g)
    for backend in W_BACKENDS:
        tight = vtw_kernels.withdraw(hidden, mask, backend=backend)
        m = tight.out.shape[1] + extra
        right = vtw_kernels.withdraw(hidden, mask, num_keep=m, backend=backend)
        left = vtw_kernels.withdraw(hidden, mask, num_keep=m, pad_left=True, backend=backend)
        assert torch.equal(tight.keep_lens, (~mask).sum(1).to(torch.int32))
        assert torch.equal(right.keep_lens, tight.keep_lens) and torch.equal(left.keep_lens, tight.keep_lens)
        assert_bits_equal(right.out[:, : tight.out.shape[1]], tight.out, "num_keep adds padding only")
        assert torch.equal(right.keep_index[:, : tight.out.shape[1]], tight.keep_index)
        assert torch.equal(right.keep_index[:, tight.out.shape[1]:], torch.full((B, extra), -1))
        for b, n in enumerate(tight.keep_lens.tolist()):
            assert_bits_equal(left.out[b, m - n:], right.out[b, :n], "pad_left shifts the row")
            assert torch.equal(left.keep_index[b, m - n:], right.keep_index[b, :n])
            assert torch.equal(left.keep_index[b, : m - n], torch.full((m - n,), -1))
            assert not bits(left.out[b, : m - n]).any() and not bits(right.out[b, n:]).any()  # +0.0 padding
            idx = right.keep_index[b, :n]
            assert bool((idx[1:] > idx[:-1]).all()) and not bool(mask[b, idx].any())


@st.composite
def cache_specs(draw):
    L = draw(st.integers(0, 3))
    tensor = st.tuples(dtypes, st.integers(0, 5), st.sampled_from(LAYOUTS))
    return draw(st.lists(tensor, min_size=L, max_size=L)), draw(st.lists(tensor, min_size=L, max_size=L))


@given(B=st.integers(0, 4), H=st.integers(0, 3), S=st.integers(0, 16), extra=st.integers(0, 3), specs=cache_specs(),
       density=densities, strided_mask=st.booleans(), seed=seeds)
def test_compact_kv_equals_reference(B, H, S, extra, specs, density, strided_mask, seed):
    g = torch.Generator().manual_seed(seed)
    mask = _mask(2 * B, 2 * S, density, g)[::2, ::2] if strided_mask else _mask(B, S, density, g)
    key_specs, value_specs = specs
    for backend in C_BACKENDS:
        caches = Caches(B, H, S + extra, key_specs, value_specs, seed=seed)
        before = caches.buf.clone()
        keys, values = caches.split(caches.buf)
        if len(keys) == 1 and seed % 2:  # single tensors instead of lists
            keys, values = keys[0], values[0]
        new_lens = vtw_kernels.compact_kv_(keys, values, mask, backend=backend)
        check_compaction(caches.buf, before, caches.views, mask, new_lens, backend)


@given(B=st.integers(1, 4), H=st.integers(1, 3), S=st.integers(1, 16), extra=st.integers(0, 3),
       Dh=st.integers(1, 5), dtype=dtypes, layout=st.sampled_from(LAYOUTS), density=densities, seed=seeds)
def test_compact_kv_agrees_with_withdraw(B, H, S, extra, Dh, dtype, layout, density, seed):
    # Compacting a cache in place keeps, per head, what withdraw gathers from the first S
    # tokens; compacting again with nothing visual changes nothing.
    g = torch.Generator().manual_seed(seed)
    mask = _mask(B, S, density, g)
    for backend in C_BACKENDS:
        caches = Caches(B, H, S + extra, [(dtype, Dh, layout)], [(dtype, Dh, layout)], seed=seed)
        (k,), (v,) = caches.split(caches.buf)
        gathered = [vtw_kernels.withdraw(t[:, h, :S], mask, backend=backend) for t in (k, v) for h in range(H)]
        new_lens = vtw_kernels.compact_kv_(k, v, mask, backend=backend)
        assert torch.equal(new_lens, ref_new_lens(mask))
        for i, w in enumerate(gathered):
            t, h = (k, v)[i // H], i % H
            assert torch.equal(w.keep_lens, new_lens)
            for b, n in enumerate(new_lens.tolist()):
                assert_bits_equal(t[b, h, :n], w.out[b, :n], f"{backend} tensor {i // H} head {h} row {b}")
        after = caches.buf.clone()
        again = vtw_kernels.compact_kv_(k, v, torch.zeros(B, S + extra, dtype=torch.bool), backend=backend)
        assert torch.equal(again, torch.full((B,), S + extra, dtype=torch.int32))
        assert torch.equal(caches.buf, after)
