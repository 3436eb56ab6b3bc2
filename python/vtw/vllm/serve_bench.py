"""Through the OpenAI-compatible server: requests/s and time to first token, stock vLLM (its
defaults, then eager) against vtw, with the ``openai`` client, on the ``small`` preset's decoder
(8 layers, hidden 512, MLP 1376, 8 heads; random weights) with LLaVA-1.5's prompt layout: 35
tokens, a 144 x 144 picture in 6 x 6 patches (576 image tokens), 60 tokens.

    python -m vtw.vllm.serve_bench [--requests 32] [--new 16] [--rounds 3] [--layer 4]

Each engine is its own server (``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1, a
free port, 1 GiB of KV cache, block size 32); per server one warm-up round, then ``--rounds``
rounds of ``--requests`` chat requests sent at once (each a different picture, as a base64 PNG
data URL, streamed, ``--new`` tokens with ``ignore_eos``). A round's requests/s is requests /
wall time; TTFT is the time from sending a request to its first streamed token. Reports the
median round of each engine and the speedups against both stock variants.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(folder: str):
    """The small preset's decoder as a LLaVA with 576-token pictures, with a chat template."""
    from vtw.bench import PRESETS
    from vtw.embedded import build as ebuild
    from vtw.vllm import tiny

    p = PRESETS["small"]
    tiny.build_llava(folder, layers=p.layers, hidden=p.hidden, heads=p.heads, intermediate=p.intermediate,
                     image_size=144, patch=6)
    with open(os.path.join(folder, "chat_template.jinja"), "w") as f:
        f.write(ebuild.CHAT_TEMPLATE)
    return p


def _start(folder, port, extra, log):
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", folder, "--served-model-name", "m",
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "1024",
           "--kv-cache-memory-bytes", str(1 << 30), "--block-size", "32", *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    t0 = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}); see {log.name}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5):
                return proc, time.monotonic() - t0
        except OSError:
            time.sleep(1)
        if time.monotonic() - t0 > 900:
            raise RuntimeError("server did not start in 900 s")


def _stop(proc):
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def _pictures(n, seed):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (144, 144, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return out


def _round(client, pictures, question, new):
    def one(url):
        t0 = time.perf_counter()
        first, n = None, 0
        stream = client.chat.completions.create(
            model="m", max_tokens=new, temperature=0.0, stream=True, extra_body={"ignore_eos": True},
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                   {"type": "text", "text": question}]}])
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                if first is None:
                    first = time.perf_counter() - t0
                n += 1
        return first, n

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(pictures)) as pool:
        res = list(pool.map(one, pictures))
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "requests_per_s": len(pictures) / wall,
            "mean_ttft_s": statistics.mean(r[0] for r in res), "median_ttft_s": statistics.median(r[0] for r in res)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layer", type=int, default=4, help="K for vtw (default 4 of 8)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    folder = tempfile.mkdtemp(prefix="vtw-serve-bench-")
    try:
        _run(args, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _run(args, folder):
    import openai

    p = build(folder)
    words = "describe the shapes and colors".split()
    # after the picture: the question and the template's "ASSISTANT :" (about 60 tokens); before it
    # <s>, the system prompt and "USER :" (35 tokens), as LLaVA-1.5's prompt
    question = " ".join(words[i % 5] for i in range(57))
    engines = [("stock (defaults)", []), ("stock (eager)", ["--enforce-eager"]),
               (f"vtw text_only K={args.layer}", ["--hf-overrides", json.dumps({"vtw_layer": args.layer})])]
    res = {"date": time.strftime("%Y-%m-%d %H:%M"), "load_average": os.getloadavg(), "layers": p.layers,
           "hidden": p.hidden, "K": args.layer, "requests": args.requests, "new": args.new, "rounds": args.rounds, "engines": {}}
    for name, extra in engines:
        port = _free_port()
        with open(os.path.join(folder, f"server-{port}.log"), "w") as log:
            proc, start_s = _start(folder, port, extra, log)
            try:
                client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=900,
                                       max_retries=0)
                _round(client, _pictures(4, 99), question, 2)  # warm-up
                usage = client.chat.completions.create(model="m", max_tokens=1, messages=[{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": _pictures(1, 98)[0]}},
                    {"type": "text", "text": question}]}]).usage
                res["prompt_tokens"] = usage.prompt_tokens
                rounds = [_round(client, _pictures(args.requests, 1000 * r + 1), question, args.new)
                          for r in range(args.rounds)]
            finally:
                _stop(proc)
        med = sorted(rounds, key=lambda r: r["requests_per_s"])[len(rounds) // 2]
        res["engines"][name] = {"start_s": start_s, "rounds": rounds, "median": med,
                                "load_average_after": os.getloadavg()}
        print(f"{name:24s} start {start_s:6.1f} s  requests/s " + " ".join(f"{r['requests_per_s']:.3f}" for r in rounds)
              + f"  mean TTFT s " + " ".join(f"{r['mean_ttft_s']:.2f}" for r in rounds), flush=True)
    print(f"prompt: {res.get('prompt_tokens')} tokens (576 of them the picture)")
    names = [n for n, _ in engines]
    v = res["engines"][names[2]]["median"]
    for base in names[:2]:
        b = res["engines"][base]["median"]
        print(f"vtw against {base}: {v['requests_per_s'] / b['requests_per_s']:.2f}x requests/s, "
              f"mean TTFT {v['mean_ttft_s']:.2f} s against {b['mean_ttft_s']:.2f} s (median rounds)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
