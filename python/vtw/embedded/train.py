"""Trains the embedded model on the shapes-on-a-grid task and writes it as a Hugging Face folder.

    python -m vtw.embedded.train                 # writes python/vtw/embedded/model/ (the shipped one)
    python -m vtw.embedded.train --out DIR       # elsewhere
    python -m vtw.embedded.train --steps 20      # a quick try

Deterministic: the model is seeded, the training pictures come from a seeded stream
(``vtw.embedded.task``), ``torch.use_deterministic_algorithms(True)``, and a fixed number of CPU
threads (``--threads``, default 2; the result of a float32 matrix product can depend on how many
threads share it). The same command on the same torch build gives the same weights, bit for bit;
the SHA-256 of the weights is printed at the end and written to ``training.json``.

Two stages, as LLaVA's recipe has (a pretrained vision encoder, kept frozen, under a language
model trained on visual instructions):

1. **vision pretraining** (stands in for CLIP's): the vision tower learns, with a linear head that
   is then thrown away, the colour and the shape (or "empty") of every patch of a picture
   (dense labels from the scene generator; 200 steps, seconds);
2. **visual instruction tuning**: the vision tower is frozen; the projector and the language model
   learn multi-turn conversations about a picture (the sample's balanced question first, then
   other questions about the same picture, of every kind), LLaVA-1.5's prompt format. The loss is
   the cross-entropy of every answer token (at its ``ASSISTANT:`` colon), with label smoothing
   0.1; AdamW, linear warm-up, cosine decay.

The folder written is the trained model with its language model's heads widened from 16 to 32
dimensions (:func:`vtw.embedded.build.widen_heads`, an exact re-layout that vLLM's CPU attention
can serve; checked against the trained model and recorded in ``training.json``), under the
llava-hf weight names, with a chat template that writes the task's prompt.

The model never sees withdrawal while training: the language model is trained on full pictures
only, so what ``vtw.calibrate`` and the demo find about its deep layers is the trained model's
own behaviour.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers

from . import build, task

DEFAULT_OUT = Path(__file__).resolve().parent / "model"


class Encoder:
    """Prompts and pictures to model inputs, exactly as the saved processor makes them
    (tests/test_demo.py checks that), without the per-picture PIL round trip."""

    def __init__(self, tokenizer=None):
        self.tokenizer = build.tokenizer() if tokenizer is None else tokenizer
        self.vocab = self.tokenizer.get_vocab()
        self._ids: dict[str, list[int]] = {}

    def prompt_ids(self, question: str) -> list[int]:
        ids = self._ids.get(question)
        if ids is None:
            text = task.prompt(question, image_token="<image>" * build.IMAGE_TOKENS)
            ids = self.tokenizer(text)["input_ids"]
            self._ids[question] = ids
        return ids

    def __call__(self, samples) -> dict:
        rows = [self.prompt_ids(s.question) for s in samples]
        S = max(len(r) for r in rows)
        ids = torch.full((len(rows), S), build.PAD_ID, dtype=torch.long)
        am = torch.zeros(len(rows), S, dtype=torch.long)
        for b, r in enumerate(rows):  # left padding, as the processor's tokenizer
            ids[b, S - len(r):] = torch.tensor(r)
            am[b, S - len(r):] = 1
        px = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float()
        px = px / 255.0  # the processor's rescale, then normalise with mean = std = 0.5
        px = (px - 0.5) / 0.5
        return {"input_ids": ids, "attention_mask": am, "pixel_values": px}

    def answer_ids(self, samples) -> torch.Tensor:
        return torch.tensor([self.vocab[s.answer] for s in samples])

    def conversations(self, samples, turns: int, rng) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """Multi-turn training inputs: (inputs, positions [N, 2] (row, position of each answer's
        ``ASSISTANT:`` colon), answer ids [N])."""
        image = "<image>" * build.IMAGE_TOKENS
        rows, pos, ans = [], [], []
        for s in samples:
            text, answers = task.conversation_text(task.conversation(s, turns, rng), image_token=image)
            rows.append(self.tokenizer(text)["input_ids"])
            ans += [self.vocab[a] for a in answers]
        S = max(len(r) for r in rows)
        colon, assistant = self.vocab[":"], self.vocab["ASSISTANT"]
        ids = torch.full((len(rows), S), build.PAD_ID, dtype=torch.long)
        am = torch.zeros(len(rows), S, dtype=torch.long)
        for b, r in enumerate(rows):
            off = S - len(r)
            ids[b, off:] = torch.tensor(r)
            am[b, off:] = 1
            pos += [(b, off + t) for t in range(1, len(r)) if r[t] == colon and r[t - 1] == assistant]
        inputs = self([s for s in samples])  # pixel values (and the single-turn ids, replaced below)
        inputs["input_ids"], inputs["attention_mask"] = ids, am
        positions = torch.tensor(pos)
        if len(positions) != len(ans):
            raise RuntimeError("vtw.embedded.train: answer positions and answers disagree")
        return inputs, positions, torch.tensor(ans)


@torch.no_grad()
def evaluate(model, encoder: Encoder, samples, batch_size: int = 128) -> dict:
    """Accuracy of the next-token argmax, overall and per question kind."""
    hits = {k: [0, 0] for k in dict.fromkeys(task.KINDS + tuple(s.kind for s in samples))}
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        logits = model(**encoder(chunk), logits_to_keep=1).logits[:, -1]
        pred = logits.argmax(-1)
        ok = (pred == encoder.answer_ids(chunk)).tolist()
        for s, o in zip(chunk, ok):
            hits[s.kind][0] += int(o)
            hits[s.kind][1] += 1
    total = sum(h[0] for h in hits.values()) / max(1, sum(h[1] for h in hits.values()))
    return {"accuracy": total, **{k: h[0] / max(1, h[1]) for k, h in hits.items()}}


def weights_sha256(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def pretrain_vision(model, encoder: Encoder, *, steps: int, batch_size: int, lr: float, rng,
                    say=lambda *a: None) -> dict:
    """Stage 1: trains the vision tower to tell, from its output at each patch (the features
    LLaVA's projector reads), the colour and the shape of the object in that cell, or that the
    cell is empty. A linear head serves the loss and is discarded. Returns the final accuracies
    over the patches that hold an object."""
    tower = model.model.vision_tower
    colors, shapes = list(task.COLORS), list(task.SHAPES)
    nc, ns = len(colors) + 1, len(shapes) + 1  # + "empty"
    head = torch.nn.Linear(tower.config.hidden_size, nc + ns)
    opt = torch.optim.AdamW(list(tower.parameters()) + list(head.parameters()), lr=lr)
    tower.train()
    acc = {}
    for step in range(steps):
        samples = [task.sample(rng) for _ in range(batch_size)]
        feats = tower(encoder(samples)["pixel_values"], output_hidden_states=True).hidden_states[-1][:, 1:]
        want_c = torch.full(feats.shape[:2], nc - 1)
        want_s = torch.full(feats.shape[:2], ns - 1)
        for b, s in enumerate(samples):
            for r, c, color, shape in s.objects:
                want_c[b, r * task.GRID + c] = colors.index(color)
                want_s[b, r * task.GRID + c] = shapes.index(shape)
        logits = head(feats)
        loss = (torch.nn.functional.cross_entropy(logits[..., :nc].flatten(0, 1), want_c.flatten())
                + torch.nn.functional.cross_entropy(logits[..., nc:].flatten(0, 1), want_s.flatten()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step + 1 == steps:
            obj = want_c < nc - 1
            acc = {"loss": round(loss.item(), 5),
                   "color_accuracy": (logits[..., :nc].argmax(-1) == want_c)[obj].float().mean().item(),
                   "shape_accuracy": (logits[..., nc:].argmax(-1) == want_s)[obj].float().mean().item(),
                   "empty_accuracy": (logits[..., :nc].argmax(-1) == want_c)[~obj].float().mean().item()}
    say(f"  vision pretraining: {steps} steps; last batch: loss {acc.get('loss', float('nan')):.4f}, colour "
        f"{acc.get('color_accuracy', 0):.3f}, shape {acc.get('shape_accuracy', 0):.3f} of the object patches")
    tower.requires_grad_(False)  # frozen from here on, as LLaVA keeps CLIP frozen
    tower.eval()
    return acc


def train(*, steps: int = 1200, batch_size: int = 32, lr: float = 1e-3, warmup: int = 50, seed: int = 0,
          threads: int = 2, turns: int = 4, log_every: int = 100, eval_samples: int = 1000, out=None,
          quiet: bool = False, vision_steps: int = 200, vision_lr: float = 3e-3, label_smoothing: float = 0.1):
    """Trains and returns (model, summary dict); saves model + processor to `out` when given.
    Sets torch's thread count and deterministic mode while it runs, and restores them after."""
    prev = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        return _train(steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, seed=seed, threads=threads,
                      turns=turns, log_every=log_every, eval_samples=eval_samples, out=out, quiet=quiet,
                      vision_steps=vision_steps, vision_lr=vision_lr, label_smoothing=label_smoothing)
    finally:
        torch.set_num_threads(prev[0])
        torch.use_deterministic_algorithms(prev[1])


def _train(*, steps, batch_size, lr, warmup, seed, threads, turns, log_every, eval_samples, out, quiet,
           vision_steps, vision_lr, label_smoothing):
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    model = build.model(seed=seed)
    model.set_attn_implementation("sdpa")
    encoder = Encoder()
    t0 = time.perf_counter()
    c0 = time.process_time()
    say(f"training the embedded model: {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{threads} thread(s)")
    vision = pretrain_vision(model, encoder, steps=vision_steps, batch_size=batch_size, lr=vision_lr,
                             rng=np.random.default_rng([task.TRAIN_SEED, seed, 1]), say=say)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in trainable if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))

    def schedule(step):  # linear warm-up, cosine decay to 5%
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    rng = np.random.default_rng([task.TRAIN_SEED, seed])
    say(f"  visual instruction tuning: {sum(p.numel() for _, p in trainable):,} trainable parameters (vision tower "
        f"frozen), {steps} steps of {batch_size} pictures x {turns} questions")
    model.train()
    model.model.vision_tower.eval()
    run_loss, run_acc, n = 0.0, 0.0, 0
    for step in range(steps):
        samples = [task.sample(rng) for _ in range(batch_size)]
        inputs, positions, target = encoder.conversations(samples, turns, rng)
        hidden = model.model(**inputs).last_hidden_state
        logits = model.lm_head(hidden[positions[:, 0], positions[:, 1]])
        loss = torch.nn.functional.cross_entropy(logits, target, label_smoothing=label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        run_loss += loss.item()
        run_acc += (logits.argmax(-1) == target).float().mean().item()
        n += 1
        if (step + 1) % log_every == 0 or step + 1 == steps:
            say(f"  step {step + 1:5d}  loss {run_loss / n:.4f}  batch accuracy {run_acc / n:.3f}  "
                f"{time.perf_counter() - t0:6.1f} s")
            run_loss, run_acc, n = 0.0, 0.0, 0
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - c0
    model.eval()
    held = task.dataset(eval_samples, task.HELD_OUT_SEED)
    acc = evaluate(model, encoder, held)
    say("held-out accuracy: " + "  ".join(f"{k} {v:.3f}" for k, v in acc.items())
        + f"  (chance {task.chance(held):.3f})")
    summary = {"steps": steps, "batch_size": batch_size, "turns": turns, "lr": lr, "warmup": warmup, "seed": seed,
               "label_smoothing": label_smoothing, "vision_steps": vision_steps, "vision_lr": vision_lr,
               "vision_pretraining": vision, "threads": threads, "train_seconds": round(seconds, 1), "train_cpu_seconds": round(cpu, 1),
               "torch": torch.__version__, "transformers": transformers.__version__,
               "held_out": {"samples": eval_samples, "seed": task.HELD_OUT_SEED, **acc},
               "weights_sha256": weights_sha256(model)}
    if out is not None:
        save(model, out, summary)
        say(f"saved to {out}")
    say(f"weights sha256 {summary['weights_sha256']}  ({seconds:.0f} s of training, {cpu:.0f} s of CPU time)")
    return model, summary


@torch.no_grad()
def compare_widened(trained, wide, samples, batch_size: int = 100) -> dict:
    """How far the shipped (head-widened, :func:`vtw.embedded.build.widen_heads`) model's logits
    are from the trained model's, at every position of the prompts of `samples` (the largest
    absolute difference, and the fraction of positions whose argmax is the same)."""
    encoder = Encoder()
    diff, same, n = 0.0, 0, 0
    for i in range(0, len(samples), batch_size):
        inputs = encoder(samples[i:i + batch_size])
        keep = inputs["attention_mask"].bool()
        a = trained(**inputs).logits[keep]
        b = wide(**inputs).logits[keep]
        diff = max(diff, (a - b).abs().max().item())
        same += int((a.argmax(-1) == b.argmax(-1)).sum())
        n += a.shape[0]
    return {"positions": n, "max_abs_logit_difference": diff, "argmax_agreement": same / n}


def save(model, out, summary: dict | None = None, check_samples: int = 1000) -> None:
    """Writes the shipped folder: the trained model with its heads widened to
    ``build.SHIPPED_HEAD_DIM`` (an exact re-layout; with a `summary`, checked against the trained
    model on `check_samples` held-out prompts and recorded in ``training.json`` under ``"shipped"``),
    under the llava-hf weight names, with the processor, tokenizer and chat template."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    wide = build.widen_heads(model)
    build.save_llava_hf(wide, out)
    build.processor().save_pretrained(out)
    if summary is not None:  # the training run's record, with the check of the widening
        held = task.dataset(check_samples, task.HELD_OUT_SEED)
        shipped = {"head_dim": build.SHIPPED_HEAD_DIM, "trained_head_dim": build.TRAINED_HEAD_DIM,
                   **compare_widened(model, wide, held),
                   "held_out_accuracy": evaluate(wide, Encoder(), held)["accuracy"],
                   "weights_sha256": weights_sha256(wide)}
        summary = {**summary, "shipped": shipped}
        (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vtw.embedded.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    p.add_argument("--steps", type=int, default=1200, help="visual instruction tuning steps (default 1200)")
    p.add_argument("--vision-steps", type=int, default=200, help="vision pretraining steps (default 200)")
    p.add_argument("--batch-size", type=int, default=32, help="pictures per step (default 32)")
    p.add_argument("--turns", type=int, default=4, help="questions per picture, as a multi-turn conversation (default 4)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights and data stream (default 0)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2; part of what fixes the result)")
    p.add_argument("--eval-samples", type=int, default=1000, help="held-out samples to report (default 1000)")
    args = p.parse_args(argv)
    for name in ("steps", "vision_steps", "batch_size", "threads", "eval_samples", "turns"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    train(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, threads=args.threads,
          turns=args.turns, eval_samples=args.eval_samples, out=args.out, vision_steps=args.vision_steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
