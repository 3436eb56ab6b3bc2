"""vtw.calibrate on tiny random-weight LLaVA-1.5 models (float32, CPU).

The KL values are checked against an independent computation written here: the paper's
algorithm run sample by sample, unpadded and without any cache, by calling the decoder layers
through their class (``ref_last_logits`` of test_enable_support: it never goes through vtw),
with the KL computed in float64. A second check uses whole-model forwards under ``vtw.enable``
(the reference way of the paper's code: one full forward per candidate K).

The answer criterion (``answer_tokens=N``) is checked the same way: the test answers each sample
greedily itself (cache-free, unpadded, one whole recomputation per token, ending after EOS), then
scores every answer position by teacher forcing, all through ``ref_last_logits``; the FLOPs saved
come from VTW.md's formula written out here."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch

import vtw
from test_enable_support import _extend, batch_inputs, llava_case, prepare, qwen2_vl_case, ref_last_logits
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



# ---------------------------------------------------------------------------------------------
# The answer criterion (answer_tokens = N) and the FLOPs saved

N = 5  # answer tokens


def ref_answer(case, prep, n: int) -> list[int]:
    """The full model's greedy answer to one sample, by the independent reference: the whole
    sequence recomputed at every token, the visual placeholder ids never chosen, the answer ending
    after EOS or at n tokens."""
    eos = case.model.config.text_config.eos_token_id
    toks = []
    while len(toks) < n:
        logits = ref_last_logits(case, L, _extend(case, prep, toks)).clone()
        logits[list(case.visual_ids)] = float("-inf")
        toks.append(int(logits.argmax()))
        if toks[-1] == eos:
            break
    return toks


def ref_answer_kl(case, prep, answer: list[int], K: int) -> float:
    """One sample's score at K: the mean over the positions predicting the answer (teacher-forced
    on it) of KL(P_withdrawn(K) || P_full)."""
    kls = []
    for t in range(len(answer)):
        seq = _extend(case, prep, answer[:t])
        kls.append(_kl64(ref_last_logits(case, K, seq), ref_last_logits(case, L, seq)))
    return sum(kls) / len(kls)


def _reference(case, n):
    answers = [ref_answer(case, p, n) for p in case.preps]
    kl = {K: [ref_answer_kl(case, p, a, K) for p, a in zip(case.preps, answers)] for K in range(L + 1)}
    return answers, kl


@pytest.fixture(scope="module")
def eos_case(case):
    """The random model with EOS made likely: EOS's output row is the row of the token the full
    model answers sample 0 with first, scaled by 1.2, so EOS now wins where that token won (and
    elsewhere only by chance). Its answers end at different lengths, some after one token."""
    first = ref_answer(case, case.preps[0], 1)[0]
    model = copy.deepcopy(case.model)
    eos = model.config.text_config.eos_token_id
    with torch.no_grad():
        model.lm_head.weight[eos] = 1.2 * model.lm_head.weight[first]
    c = dataclasses.replace(case, model=model)
    c.preps = [prepare(c, s) for s in c.samples]
    c.answers, c.ref_kl = _reference(c, N)
    return c


@pytest.fixture(scope="module")
def qwen_case():
    c = qwen2_vl_case("sdpa", layers=L)
    c.preps = [prepare(c, s) for s in c.samples]
    c.answers, c.ref_kl = _reference(c, N)
    return c


def test_answer_reference_is_not_vacuous(eos_case, ref_kl):
    eos = eos_case.model.config.text_config.eos_token_id
    lens = [len(a) for a in eos_case.answers]
    # answers of different lengths in one batch: one of a single token (EOS at once), one that
    # ends early after some words, and one that runs to N without EOS
    assert 1 in lens and N in lens and any(1 < n < N for n in lens), eos_case.answers
    for a in eos_case.answers:
        assert (a[-1] == eos) == (len(a) < N) and eos not in a[:-1], a
    # the answer's later positions change the score: it differs from the first-token criterion
    # (on the unmodified model, ref_kl) on the multi-token answers
    multi = [b for b, n in enumerate(lens) if n > 1 and b != 2]  # sample 2 has no image: KL 0 everywhere
    assert multi and all(abs(eos_case.ref_kl[0][b] - ref_kl[0][b]) > 1e-3 for b in multi)
    assert all(abs(v) < 1e-9 for v in eos_case.ref_kl[L]) and abs(eos_case.ref_kl[0][2]) < 1e-9


@pytest.mark.parametrize("padding", ["left", "right", "split"])
def test_answer_kl_matches_independent_reference(eos_case, padding):
    c = eos_case
    if padding == "left":
        batches = [batch_inputs(c)]
    elif padding == "right":  # packed to the left again before answering
        batches = [right_padded(c, c.samples)]
    else:  # a batch of one-token answers only, then a right-padded one of a full and an early-ending answer
        assert [len(a) for a in c.answers[:2]] == [1, 1] and len(set(map(len, c.answers[2:]))) == 2
        batches = [batch_inputs(c, c.samples[:2]), right_padded(c, c.samples[2:])]
    cal = calibrate(c.model, batches, answer_tokens=N, progress=False)
    assert sorted(cal.kl) == list(range(L)) and cal.num_samples == len(c.samples)
    assert cal.answer_tokens == N
    assert math.isclose(cal.mean_answer_length, sum(map(len, c.answers)) / len(c.answers))
    for K in range(L):
        expect = sum(c.ref_kl[K]) / len(c.ref_kl[K])  # the mean over samples of each sample's mean
        assert math.isclose(cal.kl[K], expect, rel_tol=1e-4, abs_tol=1e-6), (K, cal.kl[K], expect)


def test_answer_kl_matches_reference_mrope(qwen_case):
    # Qwen2-VL: M-RoPE positions from get_rope_index and per-token mm_token_type_ids in the inputs
    c = qwen_case
    assert c.ref_kl[0][0] > 1e-3 and all(len(set(a)) > 1 for a in c.answers)
    cal = calibrate(c.model, [batch_inputs(c)], answer_tokens=N, progress=False)
    for K in range(L):
        expect = sum(c.ref_kl[K]) / len(c.ref_kl[K])
        assert math.isclose(cal.kl[K], expect, rel_tol=1e-4, abs_tol=1e-6), (K, cal.kl[K], expect)


def test_answer_kl_matches_full_forwards_under_enable(eos_case):
    # A second reference: per sample, unpadded, the prompt plus the answer but its last token
    # through the whole model, with vtw.enable(model, K) and without; the logits at the last
    # len(answer) positions are those predicting the answer.
    c = eos_case
    ks = [0, 2, 3]
    cal = calibrate(c.model, [batch_inputs(c)], layers=ks, answer_tokens=N, progress=False)
    per_k = {K: [] for K in ks}
    with torch.no_grad():
        for s, a in zip(c.samples, c.answers):
            ids = torch.tensor([s.ids + a[:-1]])
            inputs = dict(input_ids=ids, **c.batch_mm([s]))
            full = c.model(**inputs).logits[0, -len(a):]
            for K in ks:
                vtw.enable(c.model, K)
                try:
                    got = c.model(**inputs).logits[0, -len(a):]
                finally:
                    vtw.disable(c.model)
                per_k[K].append(sum(_kl64(got[t], full[t]) for t in range(len(a))) / len(a))
    for K in ks:
        expect = sum(per_k[K]) / len(per_k[K])
        assert math.isclose(cal.kl[K], expect, rel_tol=1e-4, abs_tol=1e-6), (K, cal.kl[K], expect)


def test_answer_tokens_one_is_the_papers_criterion(case, ref_kl):
    cal = calibrate(case.model, [batch_inputs(case)], answer_tokens=1, progress=False)
    assert cal.mean_answer_length == 1.0
    for K in range(L):
        expect = sum(ref_kl[K]) / len(ref_kl[K])
        assert math.isclose(cal.kl[K], expect, rel_tol=1e-4, abs_tol=1e-6), (K, cal.kl[K], expect)


def test_answers_ignore_the_models_generation_config(eos_case):
    # The model's own generation config may sample or penalise repetitions; the answers stay greedy.
    c = eos_case
    gc = c.model.generation_config
    plain = calibrate(c.model, [batch_inputs(c)], answer_tokens=N, progress=False)
    changed = copy.deepcopy(gc)
    changed.do_sample, changed.temperature, changed.repetition_penalty, changed.max_new_tokens = True, 5.0, 3.0, 1
    c.model.generation_config = changed
    try:
        torch.manual_seed(1)
        again = calibrate(c.model, [batch_inputs(c)], answer_tokens=N, progress=False)
        assert c.model.generation_config is changed  # restored, as it was
    finally:
        c.model.generation_config = gc
    assert again.kl == plain.kl and again.mean_answer_length == plain.mean_answer_length


def test_answer_chosen_layer(eos_case):
    c = eos_case
    ks = [1, 2, 3]
    means = {K: sum(c.ref_kl[K]) / len(c.ref_kl[K]) for K in ks}
    vals = sorted(means.values())
    cuts = [vals[0] / 2] + [(a + b) / 2 for a, b in zip(vals, vals[1:])] + [vals[-1] * 2]
    chosen = set()
    for thr in cuts:
        expect = next((K for K in ks if means[K] <= thr), None)
        got = calibrate(c.model, [batch_inputs(c)], layers=ks, threshold=thr, answer_tokens=N, progress=False).layer
        assert got == expect, (thr, got, expect, means)
        chosen.add(got)
    assert None in chosen and len(chosen) >= 2


def test_answer_layer_evaluations_counted(eos_case):
    c = eos_case
    ks = [0, 1, 3]
    split = [c.samples[:2], c.samples[2:]]
    cal = calibrate(c.model, [batch_inputs(c, s) for s in split], layers=ks, answer_tokens=N, progress=False)
    expect = expect_ref = 0
    for part in split:
        steps = max(len(c.answers[c.samples.index(s)]) for s in part)  # generate: one forward per token
        expect += L * steps + L + sum(L - k for k in ks)
        expect_ref += L * steps + (1 + len(ks)) * L
    assert cal.layer_evals == expect and cal.layer_evals_reference == expect_ref


def _flops_fraction(samples, visual_ids, d, m, layers, K):
    def layer(n):
        return 4 * n * d * d + 2 * n * n * d + 3 * n * d * m

    full = cut = 0
    for s in samples:
        n_all = len(s.ids)
        n_text = sum(t not in visual_ids for t in s.ids)
        full += layers * layer(n_all)
        cut += K * layer(n_all) + (layers - K) * layer(n_text)
    return 1 - cut / full


@pytest.mark.parametrize("answer_tokens", [0, N])
def test_flops_saved_matches_formula(case, answer_tokens):
    # Both criteria count the prompts' prefill; a right-padded batch counts no padding.
    batches = [batch_inputs(case, case.samples[:3]), right_padded(case, case.samples[3:])]
    cal = calibrate(case.model, batches, layers=[0, 1, 2, 3, 4], answer_tokens=answer_tokens, progress=False)
    assert sorted(cal.flops_saved) == [0, 1, 2, 3, 4]
    for K in range(L + 1):
        expect = _flops_fraction(case.samples, case.visual_ids, 32, 64, L, K)
        assert math.isclose(cal.flops_saved[K], expect, rel_tol=1e-12, abs_tol=1e-15), (K, cal.flops_saved[K], expect)
    assert cal.flops_saved[L] == 0.0 and cal.flops_saved[0] > cal.flops_saved[1] > cal.flops_saved[3] > 0


def test_answer_calibration_restores_the_model(eos_case):
    c = eos_case
    inputs = batch_inputs(c)
    before = _snapshot(c.model, inputs)
    gc = c.model.generation_config
    calibrate(c.model, [inputs], answer_tokens=N, progress=False)
    assert c.model.generation_config is gc and not vtw.is_enabled(c.model)
    assert torch.equal(_snapshot(c.model, inputs), before)


def test_answer_tokens_errors(case):
    inputs = batch_inputs(case)
    with pytest.raises(ValueError, match="answer_tokens must be >= 0"):
        calibrate(case.model, [inputs], answer_tokens=-1, progress=False)
    for bad in (1.5, True, "3"):
        with pytest.raises(TypeError, match="answer_tokens must be an int"):
            calibrate(case.model, [inputs], answer_tokens=bad, progress=False)
    with pytest.raises(ValueError, match="position_ids"):
        calibrate(case.model, [dict(inputs, position_ids=torch.arange(inputs["input_ids"].shape[1])[None])],
                  answer_tokens=2, progress=False)


def test_save_has_flops_and_answer_tokens(tmp_path):
    from PIL import Image

    from vtw.calibrate import FLOPS_COLOR, KL_COLOR

    cal = Calibration(kl={0: 0.5, 1: 0.02, 2: 0.002, 3: 0.0}, layer=2, threshold=0.003, num_layers=4,
                      num_samples=3, flops_saved={0: 0.6, 1: 0.45, 2: 0.3, 3: 0.15}, answer_tokens=8,
                      mean_answer_length=3.5)
    j, p = cal.save(tmp_path)
    data = json.loads(j.read_text())
    assert data["flops_saved"] == {"0": 0.6, "1": 0.45, "2": 0.3, "3": 0.15}
    assert data["answer_tokens"] == 8 and data["mean_answer_length"] == 3.5
    assert Calibration.load(j) == cal
    with Image.open(p) as im:
        colors = {c for _, c in im.getcolors(maxcolors=1 << 20)}
    assert FLOPS_COLOR in colors and KL_COLOR in colors
    # without FLOPs (an older JSON file): no FLOPs curve
    old = Calibration.from_dict({"kl": {"0": 0.5, "1": 0.001}, "layer": 1, "threshold": 0.003, "num_layers": 2})
    assert old.flops_saved == {} and old.answer_tokens == 0
    with Image.open(old.save(tmp_path / "old")[1]) as im:
        assert FLOPS_COLOR not in {c for _, c in im.getcolors(maxcolors=1 << 20)}


def test_table_has_flops_saved():
    cal = Calibration(kl={0: 0.5, 1: 0.002}, layer=1, threshold=0.003, num_layers=2,
                      flops_saved={0: 0.612, 1: 0.306})
    lines = cal.table().splitlines()
    assert "FLOPs saved" in lines[0]
    assert lines[1].split()[:3] == ["0", "5.000e-01", "61.2%"]
    assert lines[2].split()[:3] == ["1", "2.000e-03", "30.6%"] and lines[2].rstrip().endswith("<- K")
    assert "K = 1" in lines[-1] and "30.6%" in lines[-1]
