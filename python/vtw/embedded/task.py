"""The synthetic visual question-answering task of the embedded model ("shapes on a grid").

A picture is an 8 x 8 grid of cells, 6 x 6 pixels each (48 x 48 pixels; the vision tower's
6-pixel patches are exactly the cells, so the picture becomes 64 image tokens). Between 2 and 4
cells hold an object: one of four shapes in one of six colours, on a dark, slightly noisy
background. Every question has a one-word answer and is about the picture only:

=========  ===============================================  ==================
kind       question                                         answers
=========  ===============================================  ==================
color      what color is the {shape} ?                      6 colours
shape      what shape is the {color} object ?               4 shapes
count      how many {color} objects are there ?             0, 1, 2, 3
row        which row is the {color} {shape} in ?            1 .. 8 (top to bottom)
column     which column is the {color} {shape} in ?         1 .. 8 (left to right)
=========  ===============================================  ==================

The answer is drawn first, uniformly, and the scene built around it (the object asked about is
the only one of its shape / colour / colour and shape), so the question text carries no
information about the answer: a model that cannot see the picture is at chance, which is
:func:`chance` (the mean over samples of 1 / number of possible answers of the sample's kind).

The held-out, calibration and balanced training questions are of the kinds in :data:`KINDS`
(colour and shape: what the embedded model learns to answer within its training budget); the
other kinds (:data:`ALL_KINDS`) appear as the extra turns of the training conversations.

Prompts follow LLaVA-1.5 word for word, lower-cased: its system prompt, then
``"USER: <image>\n{question} answer the question using a single word or phrase . ASSISTANT:"``
(LLaVA-1.5's instruction for short answers), and the answer is the next token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GRID = 8
CELL = 6
IMAGE_SIZE = GRID * CELL  # 48
BACKGROUND = (28, 28, 32)

COLORS = {
    "red": (220, 50, 47),
    "green": (60, 180, 75),
    "blue": (50, 90, 230),
    "yellow": (235, 210, 50),
    "purple": (150, 70, 200),
    "cyan": (60, 210, 220),
}


def _mask(rows: list[str]) -> np.ndarray:
    return np.array([[c == "#" for c in r] for r in rows], dtype=bool)


SHAPES = {
    "square": _mask(["......", ".####.", ".####.", ".####.", ".####.", "......"]),
    "circle": _mask(["..##..", ".####.", "######", "######", ".####.", "..##.."]),
    "triangle": _mask(["......", "..##..", "..##..", ".####.", "######", "......"]),
    "cross": _mask(["..##..", "..##..", "######", "######", "..##..", "..##.."]),
}

NUMBERS = [str(i) for i in range(0, GRID + 1)]  # "0" .. "8"
#: every kind of question :func:`sample` can ask
ALL_KINDS = ("color", "shape", "count", "row", "column")
#: the kinds of the balanced questions (held-out, calibration, and each training conversation's first turn)
KINDS = ("color", "shape")
#: LLaVA-1.5's system prompt, lower-cased, punctuation as separate words
SYSTEM = ("a chat between a curious human and an artificial intelligence assistant . the assistant gives "
          "helpful , detailed , and polite answers to the human ' s questions .")
#: LLaVA-1.5's instruction after a short-answer question, lower-cased
INSTRUCTION = "answer the question using a single word or phrase ."
QUESTION_WORDS = ["what", "color", "is", "the", "shape", "object", "how", "many", "objects", "are", "there",
                  "which", "row", "column", "in", "?", "."]
#: every word a prompt or an answer can contain (the tokenizer's vocabulary after its special tokens);
#: the tokenizer splits words from punctuation, as ``re.findall(r"\w+|[^\w\s]+", text)`` does
WORDS = (SYSTEM.split() + ["USER", ":", "ASSISTANT"] + QUESTION_WORDS + INSTRUCTION.split()
         + list(COLORS) + list(SHAPES) + NUMBERS)
WORDS = list(dict.fromkeys(WORDS))  # unique, in order


@dataclass
class Sample:
    image: np.ndarray  # [48, 48, 3] uint8
    question: str
    answer: str
    kind: str
    objects: list = None  # [(row, column, color, shape)], row and column 0-based

    @property
    def prompt(self) -> str:
        return prompt(self.question)

    def pil(self):
        from PIL import Image

        return Image.fromarray(self.image, mode="RGB")


def prompt(question: str, image_token: str = "<image>") -> str:
    """The LLaVA-1.5 prompt around a short-answer question (the answer is the next token)."""
    return f"{SYSTEM} USER: {image_token}\n{question} {INSTRUCTION} ASSISTANT:"


def answers(kind: str) -> list[str]:
    """The possible answers of a question kind."""
    return {"color": list(COLORS), "shape": list(SHAPES), "count": ["0", "1", "2", "3"],
            "row": NUMBERS[1:], "column": NUMBERS[1:]}[kind]


def chance(samples) -> float:
    """Expected accuracy of a guesser that sees the question but not the picture: answers are
    uniform given the question, so it is the mean of 1 / (number of possible answers)."""
    samples = list(samples)
    return float(np.mean([1.0 / len(answers(s.kind)) for s in samples])) if samples else float("nan")


def render(objects, rng: np.random.Generator) -> np.ndarray:
    """objects: list of (row, column, color name, shape name) -> [48, 48, 3] uint8 picture."""
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.int16)
    img[:] = BACKGROUND
    img += rng.integers(-6, 7, size=img.shape, dtype=np.int16)
    for r, c, color, shape in objects:
        rgb = np.array(COLORS[color], dtype=np.int16) + rng.integers(-12, 13, size=3, dtype=np.int16)
        cell = img[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL]
        cell[SHAPES[shape]] = rgb
    return np.clip(img, 0, 255).astype(np.uint8)


def _cells(rng, n):
    flat = rng.choice(GRID * GRID, size=n, replace=False)
    return [(int(i) // GRID, int(i) % GRID) for i in flat]


def _pick(rng, seq, exclude=()):
    choices = [x for x in seq if x not in exclude]
    return choices[int(rng.integers(len(choices)))]


def sample(rng: np.random.Generator, kind: str | None = None) -> Sample:
    """One random picture, question and answer (the answer uniform among its kind's answers); the
    kind is drawn uniformly from :data:`KINDS` unless given (any of :data:`ALL_KINDS`)."""
    colors, shapes = list(COLORS), list(SHAPES)
    kind = KINDS[int(rng.integers(len(KINDS)))] if kind is None else kind
    n = int(rng.integers(2, 5))
    cells = _cells(rng, n)
    objects = []
    if kind == "color":
        shape, color = _pick(rng, shapes), _pick(rng, colors)
        objects.append((*cells[0], color, shape))
        objects += [(*rc, _pick(rng, colors), _pick(rng, shapes, (shape,))) for rc in cells[1:]]
        question, answer = f"what color is the {shape} ?", color
    elif kind == "shape":
        shape, color = _pick(rng, shapes), _pick(rng, colors)
        objects.append((*cells[0], color, shape))
        objects += [(*rc, _pick(rng, colors, (color,)), _pick(rng, shapes)) for rc in cells[1:]]
        question, answer = f"what shape is the {color} object ?", shape
    elif kind == "count":
        color = _pick(rng, colors)
        k = int(rng.integers(0, 4))
        if k > n:  # room for k objects of the colour
            n, cells = k, _cells(rng, k)
        objects += [(*rc, color, _pick(rng, shapes)) for rc in cells[:k]]
        objects += [(*rc, _pick(rng, colors, (color,)), _pick(rng, shapes)) for rc in cells[k:]]
        question, answer = f"how many {color} objects are there ?", str(k)
    elif kind in ("row", "column"):
        color, shape = _pick(rng, colors), _pick(rng, shapes)
        # the target cell is uniform over the grid, so its row and column are uniform
        r, c = int(rng.integers(GRID)), int(rng.integers(GRID))
        others = [rc for rc in _cells(rng, n) if rc != (r, c)][: n - 1]
        objects.append((r, c, color, shape))
        for rc in others:
            oc, os_ = _pick(rng, colors), _pick(rng, shapes)
            while (oc, os_) == (color, shape):
                oc, os_ = _pick(rng, colors), _pick(rng, shapes)
            objects.append((*rc, oc, os_))
        question = f"which {kind} is the {color} {shape} in ?"
        answer = str((r if kind == "row" else c) + 1)
    else:
        raise ValueError(f"vtw.embedded.task.sample: kind must be one of {ALL_KINDS}, got {kind!r}")
    order = rng.permutation(len(objects))
    objects = [objects[i] for i in order]
    return Sample(render(objects, rng), question, answer, kind, objects)


def questions(objects) -> list[tuple[str, str, str]]:
    """Every question with a well-defined answer about a scene: (question, answer, kind)."""
    from collections import Counter

    by_shape = Counter(o[3] for o in objects)
    by_color = Counter(o[2] for o in objects)
    by_pair = Counter((o[2], o[3]) for o in objects)
    out = []
    for r, c, color, shape in objects:
        if by_shape[shape] == 1:
            out.append((f"what color is the {shape} ?", color, "color"))
        if by_color[color] == 1:
            out.append((f"what shape is the {color} object ?", shape, "shape"))
        if by_pair[(color, shape)] == 1:
            out.append((f"which row is the {color} {shape} in ?", str(r + 1), "row"))
            out.append((f"which column is the {color} {shape} in ?", str(c + 1), "column"))
    for color in COLORS:
        out.append((f"how many {color} objects are there ?", str(by_color[color]), "count"))
    return out


def conversation(s: Sample, turns: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    """A multi-turn conversation about one picture, LLaVA-style: the sample's own (balanced)
    question first, then `turns - 1` other questions about the same picture, in random order."""
    others = [(q, a) for q, a, _ in questions(s.objects) if q != s.question]
    pick = rng.permutation(len(others))[: max(0, turns - 1)]
    return [(s.question, s.answer)] + [others[i] for i in pick]


def conversation_text(turns: list[tuple[str, str]], image_token: str = "<image>") -> tuple[str, list[str]]:
    """The prompt of a conversation with every answer in place (each followed by ``</s>``) and the
    answers in order; the answer of turn t is predicted at the ``:`` of its ``ASSISTANT:``."""
    text = f"{SYSTEM} USER: {image_token}\n"
    for t, (q, a) in enumerate(turns):
        text += ("" if t == 0 else " USER: ") + f"{q} {INSTRUCTION} ASSISTANT: {a} </s>"
    return text, [a for _, a in turns]


def dataset(n: int, seed: int) -> list[Sample]:
    """`n` samples from a seeded generator (the same `seed` gives the same samples on any machine)."""
    rng = np.random.default_rng(seed)
    return [sample(rng) for _ in range(n)]


# Seeds of the fixed splits (training draws from its own stream, see vtw.embedded.train).
TRAIN_SEED = 1
CALIBRATION_SEED = 2
HELD_OUT_SEED = 3
