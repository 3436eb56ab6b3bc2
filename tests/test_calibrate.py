"""vtw.calibrate on tiny random-weight LLaVA-1.5 models (float32, CPU).

The KL values are checked against an independent computation written here: the paper's
algorithm run sample by sample, unpadded and without any cache, by calling the decoder layers
through their class (``ref_last_logits`` of test_enable_support: it never goes through vtw),
with the KL computed in float64. A second check uses whole-model forwards under ``vtw.enable``
(the reference way of the paper's code: one full forward per candidate K)."""

from __future__ import annotations

import json
import math

import pytest
import torch

import vtw
from test_enable_support import batch_inputs, llava_case, prepare, ref_last_logits
from vtw.calibrate import Calibration, calibrate

L = 4


@pytest.fixture(scope="module")
def case():
    c = llava_case("sdpa", layers=L)
    c.preps = [prepare(c, s) for s in c.samples]
    return c


def _kl64(logits_w, logits_f) -> float:
    lw = torch.log_softmax(logits_w.double(), -1)
    lf = torch.log_softmax(logits_f.double(), -1)
    return float((lw.exp() * (lw - lf)).sum())


@pytest.fixture(scope="module")
def ref_kl(case):
    """K -> [KL of each sample], by the independent per-sample algorithm."""
    out = {}
    full = [ref_last_logits(case, L, p) for p in case.preps]
    for K in range(L + 1):
        out[K] = [_kl64(ref_last_logits(case, K, p), f) for p, f in zip(case.preps, full)]
    return out


def right_padded(case, samples):
    S = max(len(s.ids) for s in samples)
    ids = torch.full((len(samples), S), case.pad_id, dtype=torch.long)
    am = torch.zeros(len(samples), S, dtype=torch.long)
    for b, s in enumerate(samples):
        ids[b, : len(s.ids)] = torch.tensor(s.ids)
        am[b, : len(s.ids)] = 1
    return dict(input_ids=ids, attention_mask=am, **case.batch_mm(samples))


def test_reference_is_not_vacuous(ref_kl):
    # Samples with images must have a clearly positive KL at K=0, the text-only one none at all.
    assert min(ref_kl[0][i] for i in (0, 1, 3)) > 1e-3
    assert abs(ref_kl[0][2]) < 1e-9
    assert all(abs(v) < 1e-9 for v in ref_kl[L])


@pytest.mark.parametrize("padding", ["left", "right", "split"])
def test_kl_matches_independent_reference(case, ref_kl, padding):
    if padding == "left":
        batches = [batch_inputs(case)]
    elif padding == "right":
        batches = [right_padded(case, case.samples)]
    else:  # two batches of different sizes and paddings: the mean is over samples, not batches
        batches = [batch_inputs(case, case.samples[:3]), right_padded(case, case.samples[3:])]
    cal = calibrate(case.model, batches, progress=False)
    assert sorted(cal.kl) == list(range(L))
    assert cal.num_samples == len(case.samples) and cal.num_layers == L
    for K in range(L):
        expect = sum(ref_kl[K]) / len(ref_kl[K])
        assert math.isclose(cal.kl[K], expect, rel_tol=1e-4, abs_tol=1e-6), (K, cal.kl[K], expect)


def test_kl_matches_full_forwards_under_enable(case):
    # The reference way: one whole-model forward per K with vtw.enable, logits at the last position.
    inputs = batch_inputs(case)
    cal = calibrate(case.model, [inputs], layers=[0, 2, 3], progress=False)
    with torch.no_grad():
        full = case.model(**inputs).logits[:, -1]
        for K in (0, 2, 3):
            vtw.enable(case.model, K)
            try:
                got = case.model(**inputs).logits[:, -1]
            finally:
                vtw.disable(case.model)
            expect = sum(_kl64(got[b], full[b]) for b in range(len(got))) / len(got)
            assert math.isclose(cal.kl[K], expect, rel_tol=1e-4, abs_tol=1e-6), (K, cal.kl[K], expect)


def test_layer_L_withdraws_nothing(case):
    cal = calibrate(case.model, [batch_inputs(case)], layers=[L], threshold=0.0, progress=False)
    assert cal.kl == {L: 0.0}
    assert cal.layer == L


def test_chosen_layer_is_first_at_or_under_threshold(case, ref_kl):
    cal = calibrate(case.model, [batch_inputs(case)], layers=[1, 2, 3], progress=False)
    means = {K: sum(ref_kl[K]) / len(ref_kl[K]) for K in (1, 2, 3)}
    vals = sorted(means.values())
    # thresholds strictly between the curve's values, below all and above all
    cuts = [vals[0] / 2] + [(a + b) / 2 for a, b in zip(vals, vals[1:])] + [vals[-1] * 2]
    for thr in cuts:
        again = Calibration(kl=cal.kl, layer=None, threshold=thr, num_layers=L)
        expect = next((K for K in (1, 2, 3) if means[K] <= thr), None)
        got = calibrate(case.model, [batch_inputs(case)], layers=[1, 2, 3], threshold=thr, progress=False).layer
        assert got == expect, (thr, got, expect, again.kl)
    assert calibrate(case.model, [batch_inputs(case)], layers=[1, 2, 3], threshold=0.0, progress=False).layer is None


def test_layer_evaluations_counted(case):
    ks = [0, 1, 2, 3]
    cal = calibrate(case.model, [batch_inputs(case), batch_inputs(case, case.samples[:2])], layers=ks,
                    progress=False)
    per_batch = L + sum(L - k for k in ks)  # one full forward + the text-only suffixes
    assert cal.layer_evals == 2 * per_batch
    assert cal.layer_evals_reference == 2 * (1 + len(ks)) * L
    assert 0 < cal.saved_fraction < 1


def _snapshot(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits.clone()


def test_model_restored_exactly(case):
    inputs = batch_inputs(case)
    before = _snapshot(case.model, inputs)
    calibrate(case.model, [inputs], progress=False)
    assert not vtw.is_enabled(case.model)
    assert all("forward" not in layer.__dict__ for layer in case.text.layers)
    assert torch.equal(_snapshot(case.model, inputs), before)
    # a model with withdrawal in effect is enabled again as it was
    vtw.enable(case.model, 2)
    try:
        enabled_before = _snapshot(case.model, inputs)
        calibrate(case.model, [inputs], layers=[1, 3], progress=False)
        assert vtw.is_enabled(case.model)
        assert torch.equal(_snapshot(case.model, inputs), enabled_before)
    finally:
        vtw.disable(case.model)
    assert torch.equal(_snapshot(case.model, inputs), before)


def test_model_restored_after_error(case):
    inputs = batch_inputs(case)
    before = _snapshot(case.model, inputs)
    bad = dict(inputs)
    bad["input_ids"] = inputs["input_ids"].clone()
    bad["input_ids"][0, -1] = 63  # the image token as the last prompt token
    with pytest.raises(ValueError, match="ends with a visual token"):
        calibrate(case.model, [inputs, bad], progress=False)
    assert not vtw.is_enabled(case.model)
    assert all("forward" not in layer.__dict__ for layer in case.text.layers)
    assert torch.equal(_snapshot(case.model, inputs), before)


def test_argument_errors(case):
    inputs = batch_inputs(case)
    with pytest.raises(ValueError, match="threshold"):
        calibrate(case.model, [inputs], threshold=-1.0, progress=False)
    with pytest.raises(TypeError, match="threshold"):
        calibrate(case.model, [inputs], threshold="0.1", progress=False)
    with pytest.raises(ValueError, match=r"layer must be in \[0, 4\]"):
        calibrate(case.model, [inputs], layers=[1, 5], progress=False)
    with pytest.raises(TypeError, match="layers"):
        calibrate(case.model, [inputs], layers=[1.0], progress=False)
    with pytest.raises(ValueError, match="layers is empty"):
        calibrate(case.model, [inputs], layers=[], progress=False)
    with pytest.raises(ValueError, match="batches is empty"):
        calibrate(case.model, [], progress=False)
    with pytest.raises(TypeError, match="batches must be an iterable"):
        calibrate(case.model, inputs, progress=False)
    with pytest.raises(ValueError, match="input_ids"):
        calibrate(case.model, [{"pixel_values": inputs["pixel_values"]}], progress=False)
    with pytest.raises(TypeError, match="language-modelling head"):
        calibrate(case.model.model, [inputs], progress=False)


def test_progress_bar_and_generator_batches(case, capsys):
    gen = (b for b in [batch_inputs(case)])  # an iterable without len()
    cal = calibrate(case.model, gen, layers=[2], progress=True)
    assert cal.num_samples == len(case.samples)
    assert "vtw.calibrate" in capsys.readouterr().err


def test_save_writes_json_and_png(tmp_path):
    from PIL import Image

    cal = Calibration(kl={0: 0.5, 1: 0.02, 2: 0.002, 3: 0.0}, layer=2, threshold=0.003, num_layers=4,
                      num_samples=7, layer_evals=10, layer_evals_reference=20)
    j, p = cal.save(tmp_path / "out")
    assert j == tmp_path / "out" / "calibration.json" and p == tmp_path / "out" / "calibration.png"
    data = json.loads(j.read_text())
    assert data["kl"] == {"0": 0.5, "1": 0.02, "2": 0.002, "3": 0.0}
    assert data["layer"] == 2 and data["threshold"] == 0.003 and data["num_layers"] == 4
    assert data["num_samples"] == 7 and data["layer_evals"] == 10 and data["layer_evals_reference"] == 20
    assert Calibration.load(j) == cal
    with Image.open(p) as im:
        assert im.format == "PNG" and im.size == (720, 440) and im.mode == "RGB"
        colors = {c for _, c in im.getcolors(maxcolors=1 << 20)}
    assert (200, 30, 30) in colors  # the threshold line
    assert (20, 140, 40) in colors  # the chosen K
    # a .json name: the plot goes beside it; no layer chosen: no K marker
    none = Calibration(kl={0: 0.5, 1: 0.4}, layer=None, threshold=0.003, num_layers=2)
    j2, p2 = none.save(tmp_path / "x" / "cal.json")
    assert j2.name == "cal.json" and p2 == tmp_path / "x" / "cal.png" and p2.exists()
    assert json.loads(j2.read_text())["layer"] is None
    with Image.open(p2) as im:
        assert (20, 140, 40) not in {c for _, c in im.getcolors(maxcolors=1 << 20)}


def test_table_marks_the_layer():
    cal = Calibration(kl={0: 0.5, 1: 0.002}, layer=1, threshold=0.003, num_layers=2)
    lines = cal.table().splitlines()
    assert lines[2].rstrip().endswith("<- K") and "<- K" not in lines[1]
    assert "K = 1" in lines[-1]
