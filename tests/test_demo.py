"""The embedded model and `python -m vtw demo`: the synthetic task is what it says, the shipped
processor makes exactly the inputs the training script trains on, training is deterministic, the
shipped model loads as a normal Hugging Face folder, and the demo runs end to end (short mode)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from vtw.embedded import build, task


def _scene_answer(objects, question):
    """The answer to a question about a scene, computed here from the object list alone."""
    words = question.split()
    if question.startswith("what color is the"):
        hits = [o for o in objects if o[3] == words[4]]
        return hits[0][2] if len(hits) == 1 else None
    if question.startswith("what shape is the"):
        hits = [o for o in objects if o[2] == words[4]]
        return hits[0][3] if len(hits) == 1 else None
    if question.startswith("how many"):
        return str(sum(o[2] == words[2] for o in objects))
    if question.startswith("which"):
        hits = [o for o in objects if o[2] == words[4] and o[3] == words[5]]
        if len(hits) != 1:
            return None
        return str((hits[0][0] if words[1] == "row" else hits[0][1]) + 1)
    raise AssertionError(question)


def test_task_answers_are_right_and_balanced():
    rng = np.random.default_rng(11)
    default = [task.sample(rng) for _ in range(1000)]
    assert {s.kind for s in default} == set(task.KINDS)  # the balanced questions' kinds, and only those
    samples = default + [task.sample(rng, kind) for kind in task.ALL_KINDS for _ in range(400)]
    per_kind = {k: Counter() for k in task.ALL_KINDS}
    for s in samples:
        assert _scene_answer(s.objects, s.question) == s.answer, (s.question, s.answer, s.objects)
        per_kind[s.kind][s.answer] += 1
        for q, a, _ in task.questions(s.objects):  # the extra training questions too
            assert _scene_answer(s.objects, q) == a
        # the picture shows the objects: each object's cell holds its colour, the empty cells do not
        for r, c, color, shape in s.objects:
            cell = s.image[r * task.CELL:(r + 1) * task.CELL, c * task.CELL:(c + 1) * task.CELL].astype(int)
            on = cell[task.SHAPES[shape]]
            assert np.abs(on - np.array(task.COLORS[color])).max() <= 12 + 6
    for kind, counts in per_kind.items():
        assert set(counts) == set(task.answers(kind)), kind
        expect = sum(counts.values()) / len(task.answers(kind))
        assert max(abs(v - expect) for v in counts.values()) < 0.35 * expect, (kind, counts)
    with pytest.raises(ValueError, match="kind must be one of"):
        task.sample(rng, "size")
    assert task.dataset(5, 7)[3].question == task.dataset(5, 7)[3].question
    assert np.array_equal(task.dataset(5, 7)[4].image, task.dataset(5, 7)[4].image)


def test_processor_matches_training_inputs():
    from vtw.embedded.train import Encoder

    proc = build.processor()
    proc.tokenizer.padding_side = "left"
    samples = task.dataset(6, 9)
    enc = proc(images=[s.pil() for s in samples], text=[s.prompt for s in samples], return_tensors="pt",
               padding=True)
    mine = Encoder(proc.tokenizer)(samples)
    assert torch.equal(enc["input_ids"], mine["input_ids"])
    assert torch.equal(enc["attention_mask"], mine["attention_mask"])
    torch.testing.assert_close(enc["pixel_values"], mine["pixel_values"], atol=1e-6, rtol=0)
    assert int((enc["input_ids"][0] == build.IMAGE_ID).sum()) == build.IMAGE_TOKENS == 64
    # every word of the prompts (LLaVA-1.5's system prompt and short-answer instruction) is in the vocabulary
    assert not (enc["input_ids"] == build.UNK_ID).any()
    rng = np.random.default_rng(4)
    for kind in task.ALL_KINDS:
        s = task.sample(rng, kind)
        text, _ = task.conversation_text(task.conversation(s, 4, rng))
        assert build.UNK_ID not in proc.tokenizer(text)["input_ids"], text


def test_training_is_deterministic():
    from vtw.embedded.train import train

    kw = dict(steps=2, batch_size=4, turns=2, warmup=1, eval_samples=5, quiet=True, vision_steps=2)
    _, a = train(**kw)
    _, b = train(**kw)
    _, c = train(**{**kw, "seed": 1})
    assert a["weights_sha256"] == b["weights_sha256"] != c["weights_sha256"]


def test_shipped_model_loads_and_answers():
    from vtw import embedded
    from vtw.embedded.train import Encoder, evaluate

    model, proc = embedded.load()
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    info = json.loads((embedded.MODEL_DIR / "training.json").read_text())
    held = task.dataset(info["held_out"]["samples"], task.HELD_OUT_SEED)
    acc = evaluate(model, Encoder(proc.tokenizer), held)
    # the accuracy recorded at training time is what the shipped weights give
    assert abs(acc["accuracy"] - info["held_out"]["accuracy"]) < 1e-9, (acc, info["held_out"])
    # it has learned to read the picture: far above the chance of a model that cannot see it
    assert acc["accuracy"] >= 0.9 > task.chance(held) + 0.5, acc


def test_demo_short_end_to_end():
    r = subprocess.run([sys.executable, "-m", "vtw", "demo", "--short"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    for needle in ("calibration of K on 10 samples", "calibration cost:", "full model", "withdrawal at K =",
                   "image withdrawn before layer 1 (K = 0)", "ideal speedup", "KV cache", "chance"):
        assert needle in out, needle
    rows = {}
    for line in out.splitlines():
        m = re.match(r"\s+(full model|withdrawal at K = \d+|image withdrawn before layer 1 \(K = 0\))\s+"
                     r"([\d.]+)%\s+([\d.]+) ms\s+([\d.]+) (B|KiB|MiB)\s+([\d.]+) M\s+([\d.]+)%\s+([\d.]+)x", line)
        if m:
            mib = float(m.group(4)) * {"B": 1 / 2**20, "KiB": 1 / 2**10, "MiB": 1}[m.group(5)]
            rows[m.group(1)[:6]] = dict(acc=float(m.group(2)), ms=float(m.group(3)), cache=mib,
                                        flops=float(m.group(6)), cut=float(m.group(7)), speedup=float(m.group(8)))
    assert set(rows) == {"full m", "withdr", "image "}, out
    full, blind = rows["full m"], rows["image "]
    assert full["cut"] == 0.0 and full["speedup"] == 1.0
    # K = 0: the 64 image tokens never enter the decoder: less compute and a smaller KV cache
    assert blind["cut"] > 50 and blind["flops"] < full["flops"] and blind["cache"] < full["cache"]
    assert 0 <= rows["withdr"]["cut"] <= blind["cut"]
    assert "Traceback" not in r.stderr
    # the paper's phenomenon on the shipped model (issue 6): a layer meets the threshold, withdrawing
    # the picture from it on keeps the accuracy within 2 points of the full model, and withdrawing it
    # before the first layer leaves the model near (or below) chance
    m = re.search(r"K = (\d+) \(first layer with mean KL <= ", out)
    assert m, out
    k, layers = int(m.group(1)), build.TEXT["num_hidden_layers"]
    assert 0 < k < layers
    assert rows["withdr"]["cut"] > 0
    assert abs(rows["withdr"]["acc"] - full["acc"]) <= 2.0, rows
    chance = float(re.search(r"is at chance, ([\d.]+)%", out).group(1))
    assert full["acc"] >= 90.0 and blind["acc"] <= chance + 5.0, (rows, chance)
    # the per-K table agrees with the comparison rows
    per_k = {int(a): float(b) for a, b in re.findall(r"^\s+(\d+)\s+\S.*?\s([\d.]+)%", out, re.M)}
    assert per_k[0] == blind["acc"] and per_k[k] == rows["withdr"]["acc"] and per_k[layers] == full["acc"], per_k
