"""The OpenAI-compatible server as a user runs it, with a real client: the shipped embedded model
served by ``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1 (a free port), stock, with
vtw at the demo's K and at K = 0, asked the demo's held-out questions through the ``openai``
client (pictures as base64 PNG data URLs, the chat template's prompt, concurrent requests,
streaming and non-streaming, text-only requests mixed in). The answers must be exactly the greedy
tokens of the Hugging Face model under ``vtw.enable`` at the same K, computed here in this
process; accuracy is the demo's (the picture read) and at chance at K = 0. An undecodable picture
gets HTTP 400 and the server keeps serving; every bad vtw setting stops the server at start with
one line that names the setting and what is accepted (and, in Python, the error is found inside vLLM's
config error and printed as that one line). Every process a server starts is in its own
session and is stopped (SIGTERM, then SIGKILL) however the test ends, each wait bounded."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest

import _vllm  # noqa: F401  (skips without vLLM)

openai = pytest.importorskip("openai")

import torch  # noqa: E402

from vtw import disable, embedded, enable  # noqa: E402
from vtw.embedded import task  # noqa: E402

DEMO_K = 4  # what `python -m vtw demo` calibrates for the embedded model (first-token KL, threshold 0.02)
LAYERS = 6
N_IMAGE = 24  # held-out questions with their pictures
N_TEXT = 6  # text-only questions mixed in
NEW_TOKENS = 3
START_S = 300  # a server start on a loaded 2-core machine: 40-100 s
STOP_S = 30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server's engine core is its own process
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
               VLLM_NO_USAGE_STATS="1")  # no network
    return env


def _command(port: int, overrides: dict | None) -> list[str]:
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(embedded.path()),
           "--served-model-name", "embedded", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", "256", "--kv-cache-memory-bytes", str(16 << 20), "--block-size", "32",
           # every engine eager here: no torch.compile warm-up (minutes on 2 cores); vtw engines with
           # vLLM's compilation: test_vllm_text_only, test_vllm_prefix, test_vllm_qwen2vl
           "--enforce-eager"]
    if overrides is not None:
        cmd += ["--hf-overrides", json.dumps(overrides)]
    return cmd


def _stop(proc: subprocess.Popen) -> None:
    """Stops the server and everything it started (its session), bounded in time."""
    if proc.poll() is None:
        for sig, wait in ((signal.SIGTERM, STOP_S), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
    try:  # the engine core may outlive the API process by a moment
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@contextmanager
def _server(tmp_path, overrides: dict | None):
    port = _free_port()
    log = tmp_path / f"server-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(_command(port, overrides), stdout=out, stderr=subprocess.STDOUT, env=_env(),
                                start_new_session=True)
    try:
        deadline = time.monotonic() + START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited at start ({proc.returncode}):\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not start within {START_S} s:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=120, max_retries=0), log
    finally:
        _stop(proc)


def _data_url(sample) -> str:
    buf = io.BytesIO()
    sample.pil().save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _questions():
    """(messages, sample or None, text) for the held-out questions with pictures, and text-only ones
    (the same kind of question about no picture) mixed in."""
    held = task.dataset(N_IMAGE + N_TEXT, task.HELD_OUT_SEED)
    out = []
    for i, s in enumerate(held):
        text = f"{s.question} {task.INSTRUCTION}"
        if i < N_IMAGE:
            content = [{"type": "image_url", "image_url": {"url": _data_url(s)}}, {"type": "text", "text": text}]
            out.append(([{"role": "user", "content": content}], s, text))
        else:
            out.append(([{"role": "user", "content": text}], None, text))
    order = [j for pair in zip(range(N_IMAGE), range(N_IMAGE, N_IMAGE + N_TEXT)) for j in pair]
    order += [j for j in range(len(out)) if j not in order]
    return [out[j] for j in order], held[:N_IMAGE]


@pytest.fixture(scope="module")
def questions():
    return _questions()


@pytest.fixture(scope="module")
def references(questions):
    """{K: [greedy tokens]} of the Hugging Face model under vtw.enable (K = None: the full model),
    one question at a time (no padding), the prompts the task writes (independently of the chat
    template the server applies)."""
    qs, _ = questions
    model, proc = embedded.load()
    tok = proc.tokenizer
    refs = {}
    for k in (None, DEMO_K, 0):
        if k is not None:
            enable(model, k)
        try:
            outs = []
            for _, s, text in qs:
                if s is not None:
                    enc = proc(images=[s.pil()], text=[task.prompt(s.question)], return_tensors="pt")
                else:
                    enc = tok([f"{task.SYSTEM} USER: {text} ASSISTANT:"], return_tensors="pt")
                with torch.no_grad():
                    gen = model.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1,
                                         pad_token_id=tok.pad_token_id)
                outs.append(tok.convert_ids_to_tokens(gen[0, enc["input_ids"].shape[1]:].tolist()))
        finally:
            disable(model)
        refs[k] = outs
    return refs


def _ask(client, messages, stream: bool) -> str:
    kw = dict(model="embedded", messages=messages, max_tokens=NEW_TOKENS, temperature=0.0)
    if not stream:
        return client.chat.completions.create(**kw).choices[0].message.content
    parts = []
    for chunk in client.chat.completions.create(stream=True, **kw):
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    return "".join(parts)


def _ask_all(client, qs) -> list[list[str]]:
    """Every question at once (a thread each), every other one streamed; the answers as words
    (the word-level tokenizer's tokens)."""
    with ThreadPoolExecutor(len(qs)) as pool:
        futures = [pool.submit(_ask, client, m, i % 2 == 1) for i, (m, _, _) in enumerate(qs)]
        return [f.result(timeout=300).split() for f in futures]


def _accuracy(answers, qs) -> float:
    hits = [a[:1] == [s.answer] for a, (_, s, _) in zip(answers, qs) if s is not None]
    return sum(hits) / len(hits)


@pytest.mark.parametrize("k", [None, DEMO_K, 0], ids=["stock", f"K={DEMO_K}", "K=0"])
def test_served_answers_equal_vtw_enable(tmp_path, questions, references, k):
    qs, held = questions
    ref = references[k]
    with _server(tmp_path, None if k is None else {"vtw_layer": k}) as (client, log):
        got = _ask_all(client, qs)
        if k == DEMO_K:
            # an undecodable picture: HTTP 400, and the server goes on serving
            bad = [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(
                    b"this is not a picture").decode()}}, {"type": "text", "text": qs[0][2]}]}]
            with pytest.raises(openai.BadRequestError) as e:
                _ask(client, bad, stream=False)
            assert e.value.status_code == 400
            assert _ask(client, qs[0][0], stream=True).split() == ref[0]
        text = log.read_text()
    # exactly the greedy tokens vtw.enable gives on the Hugging Face model, request by request
    assert got == ref, [(i, g, r) for i, (g, r) in enumerate(zip(got, ref)) if g != r]
    acc = _accuracy(got, qs)
    chance = task.chance(held)
    if k is None or k == DEMO_K:
        assert acc >= 0.9, acc  # the demo: 100% full and at K = 4 on 1000 held-out questions
    else:
        assert acc <= chance + 0.15, (acc, chance)  # the picture withdrawn before layer 1: chance
    # the log says withdrawal is on only where it is
    assert ("vtw.vllm" in text) if k is not None else ("withdrawn" not in text), text[-3000:]


BAD = [  # (hf_overrides, what the line must say: the setting, what is accepted, what was given)
    ({"vtw_layer": LAYERS + 1}, ("vtw_layer must be in [0, 6]", "got 7")),
    ({"vtw_layer": "4"}, ("vtw_layer must be an int in [0, 6]", "got '4'")),
    ({"vtw_layer": DEMO_K, "vtw_kv": "compact"}, ("vtw_kv must be one of 'text_only', 'shared'", "got 'compact'")),
    ({"vtw_kv": "shared"}, ("has vtw_kv but no vtw_layer", '"vtw_layer": K (an int')),
]


def test_bad_settings_stop_the_server_with_one_line(tmp_path):
    """All four starts at once (each stops while vLLM builds its config, before any engine)."""
    procs = []
    try:
        for i, (overrides, _) in enumerate(BAD):
            out, err = open(tmp_path / f"{i}.out", "wb"), open(tmp_path / f"{i}.err", "wb")
            procs.append(subprocess.Popen(_command(_free_port(), overrides), stdout=out, stderr=err, env=_env(),
                                          start_new_session=True))
            out.close()
            err.close()
        deadline = time.monotonic() + START_S
        for p in procs:
            p.wait(max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            _stop(p)
    for i, (p, (overrides, says)) in enumerate(zip(procs, BAD)):
        out, err = (tmp_path / f"{i}.out").read_text(), (tmp_path / f"{i}.err").read_text()
        assert p.returncode == 1, (overrides, p.returncode, err[-3000:])
        assert "Traceback" not in out + err, (overrides, err[-3000:])
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: vtw.vllm: ") and all(x in last for x in says), (overrides, last)
        # the line is the whole message: vtw's refusal appears nowhere else
        assert sum("vtw.vllm:" in line for line in (out + err).splitlines()) == 1, (out + err)[-3000:]


def test_an_uncaught_setting_error_is_one_line(capsys):
    """In Python too: the error vLLM's config raises (pydantic's ValidationError around vtw's
    SettingError) is found, and the process's excepthook prints its one line and nothing else;
    other exceptions go to the previous hook (a traceback)."""
    from vllm.engine.arg_utils import EngineArgs

    from vtw.vllm import _config

    args = EngineArgs(model=str(embedded.path()), dtype="float32", max_model_len=256,
                      hf_overrides={"vtw_layer": LAYERS + 1})
    with pytest.raises(Exception) as e:
        args.create_engine_config()
    assert not isinstance(e.value, _config.SettingError)  # wrapped by vLLM's pydantic config
    err = _config.setting_error(e.value)
    assert isinstance(err, _config.SettingError) and isinstance(err, ValueError)
    assert str(err) == f"vtw.vllm: vtw_layer must be in [0, {LAYERS}] (this model has {LAYERS} decoder layers; " \
                       f"{LAYERS} withdraws nothing), got {LAYERS + 1}"
    seen = []
    _config._excepthook(type(e.value), e.value, e.value.__traceback__, lambda *a: seen.append(a))
    assert capsys.readouterr().err == f"error: {err}\n" and not seen
    other = RuntimeError("not vtw's")
    _config._excepthook(RuntimeError, other, None, lambda *a: seen.append(a))
    assert capsys.readouterr().err == "" and seen == [(RuntimeError, other, None)]
    assert _config.setting_error(other) is None
