"""vtw.vllm.bench's capacity part (a) for Qwen3-VL and Gemma 3 (``--family``): the most requests
running at once under the same KV bytes, for stock vLLM (its own KV layout: one group of every
layer for Qwen3-VL, vLLM's sliding-window groups for Gemma 3), vtw text_only and vtw shared, on
tiny models with a few layers. The expected counts come from block arithmetic done here: the
scheduler admits a request once its prompt's blocks fit in every KV group, the full blocks before
the picture are prefix-cache hits shared by all requests, a text_only layer holds the text tokens
only. The lengths are chosen so that no request needs a new block while it decodes."""

import pytest

import _vllm  # noqa: F401  (skips without vLLM; the engine environment)

BS, NEW, KV_REQUESTS = 32, 4, 4


def _cdiv(a, b):
    return -(-a // b)


def _expected(res, groups):
    """Most requests admitted at once: `groups` is [(layers in the group, holds text only)]; every
    group draws its blocks from one pool of (budget / layers per group) usable blocks."""
    g = groups[0][0]
    assert all(n == g for n, _ in groups)
    usable = res["kv_budget_layer_blocks"] // g
    shared = res["tokens_before_image"] // BS  # full blocks before the first image token
    per_request = sum(_cdiv(res["text_tokens"] if text else res["tokens"], BS) - shared for _, text in groups)
    return (usable - shared * len(groups)) // per_request


@pytest.mark.parametrize("family,layers,K,stock_groups,vtw_groups", [
    # Qwen3-VL: every layer full attention; stock one group of 4, vtw two groups of K = 2
    ("qwen3_vl", 4, 2, [(4, False)], [(2, False), (2, True)]),
    # Gemma 3: 5 sliding + 1 full; max_model_len < window, so the sliding layers hold every token,
    # but vLLM keeps them in groups of their own (6 of 1 layer); vtw: 3 sliding, 3 text only
    ("gemma3", 6, 3, [(1, False)] * 6, [(3, False), (3, True)]),
])
def test_capacity_family(family, layers, K, stock_groups, vtw_groups):
    from vtw.vllm import bench

    res = bench.capacity(family, layers=layers, layer=K, image_tokens=16, kv_requests=KV_REQUESTS, new=NEW,
                         system_tokens=40, text_tokens=16, bs=BS, long_len=None)
    assert res["image_tokens"] == 16 and res["tokens"] == res["text_tokens"] + 16
    # no block boundary crossed while decoding (the counts are those at admission)
    for n in (res["tokens"], res["text_tokens"]):
        assert _cdiv(n, BS) == _cdiv(n + NEW, BS), n
    assert res["kv_budget_layer_blocks"] == KV_REQUESTS * _cdiv(res["tokens"] + NEW, BS) * layers
    eng = res["engines"]
    # equal KV bytes: every engine's usable blocks (vLLM's own tensors, less the null block)
    usable = {n: e["kv_bytes"] // e["num_blocks"] * (e["num_blocks"] - 1) for n, e in eng.items()}
    assert len(set(usable.values())) == 1, usable
    # vLLM's grouping as expected here (layers per group, text-only groups by their spec)
    assert [n for n, _ in eng["stock"]["groups"]] == [n for n, _ in stock_groups]
    assert [(n, s == "TextOnlyAttentionSpec") for n, s in eng["text_only"]["groups"]] == vtw_groups
    assert eng["shared"]["groups"] == eng["stock"]["groups"]
    stock = _expected(res, stock_groups)
    assert eng["stock"]["most_running"] == stock
    assert eng["shared"]["most_running"] == stock  # shared keeps every layer's KV
    assert eng["text_only"]["most_running"] == _expected(res, vtw_groups)
    assert eng["text_only"]["most_running"] > stock
