"""`vtw.bench` and `python -m vtw bench`: the FLOPs / ideal arithmetic against independent
computations (VTW.md's published figures, and torch's FlopCounterMode over real forwards), the
measured KV-cache bytes against the cache shapes, the command line end to end on the tiny preset
(JSON and PNG written), and its one-line errors. No timing is asserted."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import vtw
from vtw import bench
from vtw.__main__ import main

TINY = bench.PRESETS["tiny"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _layer(n, d, m):  # VTW.md, written out again: QKVO projections, scores and mixing, SwiGLU MLP
    return 4 * n * d * d + 2 * n * n * d + 3 * n * d * m


@pytest.mark.parametrize("text, K, cut, speedup", [(60, 15, 0.458, 1.84), (60, 16, 0.431, 1.76),
                                                    (150, 15, 0.405, None), (150, 16, 0.381, None)])
def test_ideal_reproduces_vtw_md(text, K, cut, speedup):
    # VTW.md: LLaVA-1.5-7B, 35 system + 576 image + 60 text tokens: K = 15 cuts 45.8% (1.84x),
    # K = 16 cuts 43.1% (1.76x); with 150 text tokens 40.5% and 38.1%.
    p = bench.PRESETS["llava-1.5-7b"]
    n_text = 35 + text
    got = bench.ideal(p, n_text + 576, n_text, K)
    assert round(got["cut"], 3) == cut
    if speedup is not None:
        assert round(got["decoder"], 2) == speedup
    # and against the formula written here
    full = 32 * _layer(n_text + 576, 4096, 11008)
    withdrawn = K * _layer(n_text + 576, 4096, 11008) + (32 - K) * _layer(n_text, 4096, 11008)
    assert got["decoder"] == pytest.approx(full / withdrawn, rel=1e-12)
    assert got["end_to_end"] < got["decoder"]  # the vision tower does not shrink
    assert bench.ideal(p, n_text + 576, n_text, 32)["decoder"] == 1.0


def test_vision_share_of_the_7b_shape():
    # CLIP ViT-L/14-336 (24 layers on 577 tokens) + projector against the 7B decoder: a few percent.
    p = bench.PRESETS["llava-1.5-7b"]
    vis = 24 * (4 * 577 * 1024 ** 2 + 2 * 577 ** 2 * 1024 + 2 * 577 * 1024 * 4096) \
        + 576 * 3 * 14 * 14 * 1024 + 576 * (1024 * 4096 + 4096 * 4096)
    assert bench.vision_flops(p) == vis
    share = bench.ideal(p, 671, 95, 16)["vision_share"]
    assert share == pytest.approx(vis / (vis + 32 * _layer(671, 4096, 11008) + 4096 * 32064), rel=1e-12)
    assert 0.03 < share < 0.06


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_param_count_matches_the_model(name):
    p = bench.PRESETS[name]
    if name == "small":  # no need to allocate it: build on the meta device
        with torch.device("meta"):
            from transformers import LlavaForConditionalGeneration

            model = LlavaForConditionalGeneration(bench.llava_config(p))
    else:
        model = bench.build_model(p)
    counts = bench.param_count(p)
    assert sum(counts.values()) == sum(x.numel() for x in model.parameters())
    lm = model.model.language_model
    assert counts["decoder"] == sum(x.numel() for x in lm.layers.parameters()) + lm.norm.weight.numel()
    assert counts["head"] == model.lm_head.weight.numel()


@pytest.mark.parametrize("K", [0, 2, 4])
def test_flops_match_torch_flop_counter(K):
    # Eager attention (its matmuls are counted; the CPU SDPA kernel is not): the multiply-adds the
    # bench module computes, times 2, are what torch counts in real forwards, full and withdrawn.
    model = bench.build_model(TINY, attn="eager")
    B, text = 2, 7
    inputs = bench.make_inputs(TINY, B, system_tokens=5, text_tokens=text)
    n_text = 5 + text
    n_all = n_text + TINY.image_tokens
    counted = {}
    for k in (None, K):
        if k is None:
            vtw.disable(model)
        else:
            vtw.enable(model, k)
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            model(**inputs, use_cache=True, logits_to_keep=1)
        # The rotary tables are not in VTW.md's formula (transformers 5.17 builds them with a
        # small matmul, counted here; later releases with elementwise products, not counted).
        rotary = sum(n for mod, ops in fc.get_flop_counts().items() if mod.endswith("rotary_emb")
                     for n in ops.values())
        counted[k] = fc.get_total_flops() - rotary
    vtw.disable(model)
    fixed = bench.vision_flops(TINY) + bench.head_flops(TINY)
    assert counted[None] == 2 * B * (bench.decoder_flops(TINY, n_all, n_text, None) + fixed)
    assert counted[K] == 2 * B * (bench.decoder_flops(TINY, n_all, n_text, K) + fixed)
    assert counted[None] / counted[K] == pytest.approx(bench.ideal(TINY, n_all, n_text, K)["end_to_end"], rel=1e-12)


def test_measure_kv_bytes_match_the_cache_shapes():
    model = bench.build_model(TINY)
    B, new = 2, 3
    inputs = bench.make_inputs(TINY, B)
    n_text = bench.SYSTEM_TOKENS + bench.TEXT_TOKENS
    n_all = n_text + TINY.image_tokens
    K = 1
    res = bench.measure(model, TINY, inputs, [None, K], repeats=2, new_tokens=new, warmup=0)
    assert not vtw.is_enabled(model)
    per_token = 2 * B * TINY.kv_heads * TINY.head_dim * 4  # K and V, float32
    assert res[None]["kv_prefill"] == [n_all * per_token] * TINY.layers
    assert res[None]["kv_end"] == [(n_all + new) * per_token] * TINY.layers
    assert res[K]["kv_end"] == [(n_all + new) * per_token] * K + [(n_text + new) * per_token] * (TINY.layers - K)
    for k in (None, K):
        assert len(res[k]["prefill_s"]) == 2 and len(res[k]["decode_s"]) == 2
    row = bench.summarise(TINY, B, K, n_all, n_text, new, res, weight_bytes=1e6, elt=4)
    assert row["kv"]["deep_cut"] == pytest.approx(1 - (n_text + new) / (n_all + new))
    assert row["kv"]["visual_fraction_deep"] == pytest.approx(TINY.image_tokens / (n_all + new))
    assert row["ratio_decoder"] == pytest.approx(row["prefill_speedup"] / row["ideal_decoder"])


def test_decode_bytes_model():
    p = TINY
    w, B, n_all, n_text, new, K = 1000.0, 2, 50, 10, 3, 1
    per = 2 * p.kv_heads * p.head_dim * 2 * B  # bf16
    avg_new = (1 + 2 + 3) / 3  # tokens generated before each of the 3 steps, plus the step's own: 1, 2, 3
    full = w + p.layers * (n_all + avg_new) * per
    cut = w + (K * (n_all + avg_new) + (p.layers - K) * (n_text + avg_new)) * per
    got = bench.decode_ideal(p, B, n_all, n_text, K, new, w, 2)
    assert got["speedup"] == pytest.approx(full / cut)
    assert bench.decode_ideal(p, B, n_all, n_text, p.layers, new, w, 2)["speedup"] == 1.0


def test_make_inputs_layout():
    x = bench.make_inputs(TINY, 3, system_tokens=4, text_tokens=5, seed=1)
    ids = x["input_ids"]
    assert ids.shape == (3, 4 + TINY.image_tokens + 5) and (ids[:, 0] == 1).all()
    img = ids == TINY.image_token_id
    assert img.sum(1).tolist() == [TINY.image_tokens] * 3 and img[:, 4:4 + TINY.image_tokens].all()
    assert (ids[~img] < TINY.image_token_id).all()
    assert x["pixel_values"].shape == (3, 3, TINY.image_size, TINY.image_size)


def run_cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_end_to_end(tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "b"
    rc, stdout, stderr = run_cli(capsys, "bench", "--preset", "tiny", "--batch", "1,2", "-K", 2, "--repeats", 2,
                                 "--warmup", 0, "--new-tokens", 2, "--sweep", "0,2,4", "--out", out)
    assert rc == 0, stderr
    res = json.loads((out / "bench.json").read_text())
    assert [r["batch"] for r in res["rows"]] == [1, 2] and all(r["K"] == 2 for r in res["rows"])
    assert res["prompt"] == {"system": 35, "image": 16, "text": 60, "n_all": 111, "n_text": 95}
    for r in res["rows"]:
        assert len(r["prefill_s"]["full"]) == len(r["prefill_s"]["withdrawn"]) == 2
        assert r["ideal_decoder"] == pytest.approx(bench.ideal(TINY, 111, 95, 2)["decoder"])
        assert r["kv"]["withdrawn"]["deep"] < r["kv"]["full"]["deep"]
        assert r["decode_tokens_per_s"]["full"] > 0
    assert sorted((s["batch"], s["K"]) for s in res["sweep"]) == [(b, k) for b in (1, 2) for k in (0, 2, 4)]
    assert res["machine"]["threads"] == 1 and "load_average" in res["machine"]
    with Image.open(out / "bench_sweep.png") as im:
        assert im.format == "PNG" and im.size == (720, 440)
    assert "ideal VTW.md" in stdout and "tok/s" in stdout and "wrote" in stdout


def test_cli_without_decode_or_sweep(tmp_path, capsys):
    rc, stdout, stderr = run_cli(capsys, "bench", "--preset", "tiny", "--repeats", 1, "--warmup", 0,
                                 "--new-tokens", 0, "--out", tmp_path)
    assert rc == 0, stderr
    res = json.loads((tmp_path / "bench.json").read_text())
    assert res["rows"][0]["batch"] == 2 and res["rows"][0]["K"] == TINY.layers // 2
    assert "decode_tokens_per_s" not in res["rows"][0] and res["sweep"] == []
    assert not (tmp_path / "bench_sweep.png").exists()


@pytest.mark.parametrize("argv, message", [
    (["-K", "5"], "--layer: preset tiny has 4 decoder layers"),
    (["--sweep", "0,9"], "--sweep: preset tiny has 4 decoder layers"),
    (["--device", "nonsense"], "--device"),
])
def test_cli_errors(tmp_path, capsys, argv, message):
    rc, stdout, stderr = run_cli(capsys, "bench", "--preset", "tiny", "--out", tmp_path, *argv)
    assert rc == 1
    assert stderr.startswith("vtw bench: error: ") and message in stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr


def test_cli_out_is_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    rc, _, stderr = run_cli(capsys, "bench", "--preset", "tiny", "--repeats", 1, "--new-tokens", 0, "--out", f)
    assert rc == 1 and "--out" in stderr and len(stderr.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_cli_gpu_preset_without_gpu(capsys, tmp_path):
    rc, _, stderr = run_cli(capsys, "bench", "--preset", "llava-1.5-7b", "--out", tmp_path)
    assert rc == 1 and "no CUDA device" in stderr and "--device cpu" in stderr
    rc, _, stderr = run_cli(capsys, "bench", "--preset", "tiny", "--device", "cuda", "--out", tmp_path)
    assert rc == 1 and "no CUDA device" in stderr


@pytest.mark.parametrize("argv", [["--batch", "0"], ["--batch", "x"], ["--repeats", "0"], ["--preset", "huge"],
                                  ["--sweep", "3-1"], ["--new-tokens", "-1"]])
def test_cli_argument_errors(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(["bench", *argv])
    assert e.value.code == 2
    assert "python -m vtw bench: error:" in capsys.readouterr().err
