"""The built-in spoken-scenes corpus: drawn scenes, captions from a grammar, speech from eSpeak NG.

Each image is a 128x128 scene of one to three objects (eight geometric shapes and real handwritten
digits from scikit-learn's ``load_digits``), each with a colour and a size, laid out alone at a
position, as a pair (one above / left of the other) or as a row or column of three. Five captions
per image paraphrase the whole scene (synonyms, word orders, either side of a relation), so a
perfect reader can tell every test image apart: :func:`oracle_recall` parses captions back into
scenes and measures that ceiling. Every caption is spoken by one of many eSpeak voices at a random
rate and pitch, with exact word and phone times.

Held out, to measure generalisation:

* voices: the test splits use accents and voice variants that train / val never hear
  (``foreign_accents`` adds eSpeak's Afrikaans, German and Dutch voices reading the English captions
  to the training voices: foreign-accented English, a wider spread of pronunciations to learn from);
* compositions: a few colour-object pairs (:data:`HELD_OUT_PAIRS`) appear only in
  ``test_compositional``, never in train, val or test.

``generate(out_dir, size, seed)`` writes the prepared-corpus format (docs/DESIGN.md). The bytes
depend only on (size, seed), not on the number of workers: every random choice is drawn up front in
this process, and drawing and speaking are pure functions of those choices.
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import re
import shutil
import sys
import textwrap
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from s2i.datasets.corpus import CorpusError, Manifest, read_corpus, read_split, update_report, write_corpus
from s2i.datasets.speech_synthesis import FOREIGN_ACCENTS, synthesize

log = logging.getLogger(__name__)

NAME = "synthetic"
GENERATOR_VERSION = 1  # bump when the output for a given (size, seed) changes
IMAGE_SIZE = 128
SAMPLE_RATE = 16000
CAPTIONS_PER_IMAGE = 5

# ---------------------------------------------------------------------------------------------
# The world: objects, colours, sizes, layouts and their words
# ---------------------------------------------------------------------------------------------
#: canonical colour -> (RGB, words that name it)
COLOURS: dict[str, tuple[tuple[int, int, int], tuple[str, ...]]] = {
    "red": ((215, 35, 35), ("red", "scarlet")),
    "orange": ((245, 135, 20), ("orange",)),
    "yellow": ((235, 200, 20), ("yellow",)),
    "green": ((35, 150, 55), ("green",)),
    "blue": ((35, 85, 215), ("blue",)),
    "purple": ((125, 50, 175), ("purple", "violet")),
    "pink": ((240, 115, 180), ("pink",)),
    "black": ((25, 25, 25), ("black",)),
}
SIZES: dict[str, tuple[int, tuple[str, ...]]] = {  # canonical size -> (radius in pixels, words)
    "small": (12, ("small", "little", "tiny")),
    "large": (20, ("large", "big")),
}
SHAPES: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "star": ("star",),
    "heart": ("heart",),
    "cross": ("cross", "plus sign"),
    "diamond": ("diamond", "rhombus"),
    "hexagon": ("hexagon",),
}
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
OBJECTS = tuple(SHAPES) + DIGITS
#: colour-object pairs seen only in ``test_compositional`` (one per colour)
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "heart"), ("orange", "two"), ("yellow", "square"), ("green", "star"),
    ("blue", "triangle"), ("purple", "seven"), ("pink", "circle"), ("black", "hexagon"),
)
#: single-object positions: centre (x, y) on the canvas and their phrases
POSITIONS: dict[str, tuple[tuple[int, int], tuple[str, ...]]] = {
    "left": ((32, 64), ("on the left", "at the left", "on the left side")),
    "right": ((96, 64), ("on the right", "at the right", "on the right side")),
    "top": ((64, 32), ("at the top", "near the top", "in the upper part")),
    "bottom": ((64, 96), ("at the bottom", "near the bottom", "in the lower part")),
    "centre": ((64, 64), ("in the middle", "in the centre")),
}
RELATIONS: dict[str, tuple[str, ...]] = {  # the first object is <relation> the second
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
    "left_of": ("to the left of", "left of"),
    "right_of": ("to the right of", "right of"),
}
LAYOUT_WEIGHTS = {"single": 0.3, "pair": 0.5, "triple": 0.2}

# ---------------------------------------------------------------------------------------------
# Voices: train/val and test never share an accent or a voice variant
# ---------------------------------------------------------------------------------------------
TRAIN_ACCENTS = ("en", "en-us", "en-us-nyc", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd")
TEST_ACCENTS = ("en-gb-scotland", "en-029")
TRAIN_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "f1", "f2", "f3", "f4",
                  "klatt", "klatt3", "Alex", "Annie", "adam", "david", "linda", "paul", "quincy", "robert")
TEST_VARIANTS = ("m7", "m8", "f5", "klatt2", "steph", "travis", "edward")
RATE_RANGE = (150, 210)  # words per minute
PITCH_RANGE = (30, 70)


def voices_for(split: str, foreign_accents: bool = False) -> list[str]:
    """The eSpeak voices (``accent+variant``) that speak ``split``; ``foreign_accents`` adds
    :data:`~s2i.datasets.speech_synthesis.FOREIGN_ACCENTS` to the training ones (never to the test splits)."""
    held_out = split.startswith("test")
    accents, variants = (TEST_ACCENTS, TEST_VARIANTS) if held_out else (TRAIN_ACCENTS, TRAIN_VARIANTS)
    if foreign_accents and not held_out:
        accents = accents + FOREIGN_ACCENTS
    return [f"{a}+{v}" for a in accents for v in variants]


#: images per split for each size
SIZES_PRESETS: dict[str, dict[str, int]] = {
    "small": {"train": 24, "val": 6, "test": 10, "test_compositional": 5},
    "default": {"train": 5000, "val": 500, "test": 1000, "test_compositional": 200},
    "large": {"train": 20000, "val": 1000, "test": 1000, "test_compositional": 200},
}
SPLITS = ("train", "val", "test", "test_compositional")
CHUNK_IMAGES = 4  # images per worker task


class SyntheticCorpusError(CorpusError):
    """Bad arguments to the synthetic corpus generator."""


# ---------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Thing:
    """One object of a scene."""

    kind: str  # a key of SHAPES or a digit name
    colour: str
    size: str


@dataclass(frozen=True)
class Scene:
    """What an image shows, in canonical form: equal scenes are indistinguishable by description.

    ``layout`` is ``single`` (one thing at ``position``), ``h`` / ``v`` (two things, left-to-right /
    top-to-bottom) or ``row`` / ``column`` (three things, in that order).
    """

    layout: str
    things: tuple[Thing, ...]
    position: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"layout": self.layout, "position": self.position, "objects": [asdict(t) for t in self.things]}


def _random_thing(rng: np.random.Generator, allowed: bool | None) -> Thing:
    """A random thing; ``allowed`` False = only held-out colour-object pairs, True = none of them."""
    while True:
        if allowed is False:
            colour, kind = HELD_OUT_PAIRS[rng.integers(len(HELD_OUT_PAIRS))]
        else:
            colour, kind = list(COLOURS)[rng.integers(len(COLOURS))], OBJECTS[rng.integers(len(OBJECTS))]
        if allowed is None or ((colour, kind) in HELD_OUT_PAIRS) != allowed:
            return Thing(kind=kind, colour=colour, size=list(SIZES)[rng.integers(len(SIZES))])


def sample_scene(rng: np.random.Generator, compositional: bool = False) -> Scene:
    """A random scene; ``compositional`` scenes hold at least one held-out colour-object pair and
    the others hold none."""
    layout = str(rng.choice(list(LAYOUT_WEIGHTS), p=list(LAYOUT_WEIGHTS.values())))
    n = {"single": 1, "pair": 2, "triple": 3}[layout]
    things = [_random_thing(rng, True) for _ in range(n)]
    if compositional:
        things[rng.integers(n)] = _random_thing(rng, False)
    if layout == "single":
        return Scene("single", tuple(things), position=list(POSITIONS)[rng.integers(len(POSITIONS))])
    axis = ("h", "v") if n == 2 else ("row", "column")
    return Scene(axis[rng.integers(2)], tuple(things))


def sample_scenes(counts: dict[str, int], seed: int) -> dict[str, list[Scene]]:
    """Scenes for every split, all different from one another (so no test scene is in train)."""
    seen: set[Scene] = set()
    out: dict[str, list[Scene]] = {}
    # test scenes first, so the held-out splits are the same whatever the train size
    for split in sorted(counts, key=lambda s: (not s.startswith("test"), SPLITS.index(s))):
        rng = np.random.default_rng([seed, SPLITS.index(split), 0])
        scenes: list[Scene] = []
        while len(scenes) < counts[split]:
            scene = sample_scene(rng, compositional=split == "test_compositional")
            if scene not in seen:
                seen.add(scene)
                scenes.append(scene)
        out[split] = scenes
    return {s: out[s] for s in counts}


# ---------------------------------------------------------------------------------------------
# Captions and the reader that parses them back
# ---------------------------------------------------------------------------------------------
def _article(word: str) -> str:
    return "an" if word[0] in "aeio" and not word.startswith("one") else "a"


def _noun_phrase(thing: Thing, rng: np.random.Generator) -> str:
    pick = lambda options: options[rng.integers(len(options))]  # noqa: E731
    colour, size = pick(COLOURS[thing.colour][1]), pick(SIZES[thing.size][1])
    if thing.kind in SHAPES:
        noun = pick(SHAPES[thing.kind])
    else:
        # a bare "one" reads as the pronoun ("a red one"), so it always comes with its noun
        noun = pick(((thing.kind,) if thing.kind != "one" else ()) + (f"number {thing.kind}", f"digit {thing.kind}"))
    words = f"{size} {colour} {noun}" if rng.random() < 0.7 else f"{size} {noun} in {colour}"
    return f"{_article(words)} {words}"


_SINGLE_TEMPLATES = ("{x} {p}", "there is {x} {p}", "{p}, there is {x}", "{x} is {p}", "the picture shows {x} {p}",
                     "you can see {x} {p}")
_PAIR_TEMPLATES = ("{a} {r} {b}", "there is {a} {r} {b}", "{r} {b}, there is {a}", "{a} is {r} {b}",
                   "the picture shows {a} {r} {b}", "you can see {a} {r} {b}")
_TRIPLE_TEMPLATES = {
    "row": ("from left to right, {x1}, {x2} and {x3}", "from right to left, {x3}, {x2} and {x1}",
            "{x1} on the left, {x2} in the middle and {x3} on the right",
            "{x3} on the right, {x2} in the middle and {x1} on the left",
            "{x2} between {x1} on the left and {x3} on the right", "a row of {x1}, {x2} and {x3}, from left to right"),
    "column": ("from top to bottom, {x1}, {x2} and {x3}", "from bottom to top, {x3}, {x2} and {x1}",
               "{x1} at the top, {x2} in the middle and {x3} at the bottom",
               "{x3} at the bottom, {x2} in the middle and {x1} at the top",
               "{x2} between {x1} at the top and {x3} at the bottom", "a column of {x1}, {x2} and {x3}, from top to bottom"),
}


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """One random paraphrase that states every object's size, colour and kind, and the layout."""
    pick = lambda options: options[rng.integers(len(options))]  # noqa: E731
    things = scene.things
    if scene.layout == "single":
        text = pick(_SINGLE_TEMPLATES).format(x=_noun_phrase(things[0], rng), p=pick(POSITIONS[scene.position][1]))
    elif scene.layout in ("h", "v"):
        first, second = things
        relation = "left_of" if scene.layout == "h" else "above"
        if rng.random() < 0.5:  # describe from the other object's side
            first, second = second, first
            relation = {"left_of": "right_of", "above": "below"}[relation]
        text = pick(_PAIR_TEMPLATES).format(a=_noun_phrase(first, rng), r=pick(RELATIONS[relation]),
                                            b=_noun_phrase(second, rng))
    else:
        phrases = {f"x{i + 1}": _noun_phrase(t, rng) for i, t in enumerate(things)}
        text = pick(_TRIPLE_TEMPLATES[scene.layout]).format(**phrases)
    return text


def captions(scene: Scene, rng: np.random.Generator, n: int = CAPTIONS_PER_IMAGE) -> list[str]:
    """``n`` different paraphrases of ``scene``."""
    out: list[str] = []
    for _ in range(50 * n):
        text = caption(scene, rng)
        if text not in out:
            out.append(text)
        if len(out) == n:
            return out
    raise AssertionError(f"could not find {n} different captions for {scene}")


def _alternation(words: Iterable[str]) -> str:
    return "|".join(sorted((re.escape(w) for w in words), key=len, reverse=True))


def _lookup(table: dict[str, Sequence[str]]) -> dict[str, str]:
    return {word: key for key, words in table.items() for word in words}


_COLOUR_OF = _lookup({k: v[1] for k, v in COLOURS.items()})
_SIZE_OF = _lookup({k: v[1] for k, v in SIZES.items()})
_KIND_OF = {**_lookup(SHAPES), **{w: d for d in DIGITS for w in (d, f"number {d}", f"digit {d}")}}
_C, _S, _K = _alternation(_COLOUR_OF), _alternation(_SIZE_OF), _alternation(_KIND_OF)
_THING = re.compile(rf"\ban? (?:(?P<s1>{_S}) (?P<c1>{_C}) (?P<k1>{_K})|(?P<s2>{_S}) (?P<k2>{_K}) in (?P<c2>{_C}))\b")
_POSITION_OF = _lookup({k: v[1] for k, v in POSITIONS.items()})
_POSITION = re.compile(rf"\b({_alternation(_POSITION_OF)})\b")
_RELATION_OF = _lookup(RELATIONS)
_RELATION = re.compile(rf"\b({_alternation(_RELATION_OF)})\b")
_DIRECTION = re.compile(r"\bfrom (left|right|top|bottom) to (left|right|top|bottom)\b")
_SLOT = {"left": 0, "top": 0, "centre": 1, "right": 2, "bottom": 2}


def parse_caption(text: str) -> Scene | None:
    """The scene a caption describes, read with the grammar's lexicon (None if it does not parse).

    This is the "perfect reader" of :func:`oracle_recall`: it uses the words only, never the
    generator's record of the image.
    """
    text = text.lower()
    mentions = list(_THING.finditer(text))
    things = [
        Thing(kind=_KIND_OF[m["k1"] or m["k2"]], colour=_COLOUR_OF[m["c1"] or m["c2"]], size=_SIZE_OF[m["s1"] or m["s2"]])
        for m in mentions
    ]
    if len(things) == 1:
        pos = _POSITION.search(text)
        return Scene("single", tuple(things), position=_POSITION_OF[pos[1]]) if pos else None
    if len(things) == 2:
        rel = _RELATION.search(text)
        if rel is None:
            return None
        a, b = things if rel.start() > mentions[0].start() else things[::-1]  # "above B there is A"
        relation = _RELATION_OF[rel[1]]
        if relation in ("right_of", "below"):
            a, b = b, a
        return Scene("h" if relation in ("left_of", "right_of") else "v", (a, b))
    if len(things) == 3:
        direction = _DIRECTION.search(text)
        if direction:
            order = things if direction[1] in ("left", "top") else things[::-1]
            return Scene("row" if direction[1] in ("left", "right") else "column", tuple(order))
        slots: list[Thing | None] = [None, None, None]
        axis = None
        for i, m in enumerate(mentions):  # each mention is followed by its place, or by "between"
            end = mentions[i + 1].start() if i + 1 < len(mentions) else len(text)
            after = text[m.end() : end]
            pos = _POSITION.search(after)
            if after.strip().startswith("between"):
                slots[1] = things[i]
            elif pos:
                where = _POSITION_OF[pos[1]]
                slots[_SLOT[where]] = things[i]
                if where != "centre":
                    axis = "row" if where in ("left", "right") else "column"
            else:
                return None
        if None in slots or axis is None:
            return None
        return Scene(axis, tuple(slots))  # type: ignore[arg-type]
    return None


def oracle_recall(records: Sequence[dict]) -> float:
    """R@1 of a perfect reader of the captions: each caption retrieves the images whose scene its
    parse matches; it scores 1/n if its own image is among the n matches, else 0."""
    by_scene: dict[Scene, set[str]] = {}
    image_scene: dict[str, Scene] = {}
    for rec in records:
        scene = _scene_from_dict(rec["scene"])
        image_scene[rec["image_id"]] = scene
        by_scene.setdefault(scene, set()).add(rec["image_id"])
    score = 0.0
    for rec in records:
        parsed = parse_caption(rec["text"])
        matches = by_scene.get(parsed, set()) if parsed is not None else set()
        if rec["image_id"] in matches:
            score += 1.0 / len(matches)
    return score / max(len(records), 1)


def _scene_from_dict(d: dict[str, Any]) -> Scene:
    things = tuple(Thing(kind=o["kind"], colour=o["colour"], size=o["size"]) for o in d["objects"])
    return Scene(d["layout"], things, position=d.get("position", ""))


# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------
_SUPERSAMPLE = 4
_BACKGROUNDS = ((226, 226, 226), (236, 229, 212), (220, 228, 236), (241, 240, 235), (228, 236, 222))


@lru_cache(maxsize=1)
def _digit_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 handwritten digits (8x8, values 0-16) and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int64)


def digit_pool(kind: str, held_out: bool) -> np.ndarray:
    """Indices of the handwritten samples of a digit; test splits draw from other samples than train."""
    _, labels = _digit_images()
    idx = np.flatnonzero(labels == DIGITS.index(kind))
    return idx[(idx % 5 == 0) == held_out]


def _shape_polygon(kind: str, r: float) -> list[tuple[float, float]] | None:
    """Outline of a shape of radius ``r`` around the origin (y down); None for the circle."""
    if kind == "circle":
        return None
    if kind == "square":
        h = 0.82 * r
        return [(-h, -h), (h, -h), (h, h), (-h, h)]
    if kind == "triangle":
        a = np.radians([-90, 30, 150])
        return [(1.1 * r * np.cos(t), 1.1 * r * np.sin(t) + 0.15 * r) for t in a]
    if kind == "star":
        pts = []
        for i in range(10):
            rad = 1.1 * r if i % 2 == 0 else 0.45 * r
            t = np.radians(-90 + 36 * i)
            pts.append((rad * np.cos(t), rad * np.sin(t) + 0.08 * r))
        return pts
    if kind == "heart":
        t = np.linspace(0, 2 * np.pi, 80, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        s = r / 16.0
        return list(zip(x * s, (y + 2) * s))
    if kind == "cross":
        a, w = r, 0.32 * r
        return [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a), (-w, w), (-a, w), (-a, -w), (-w, -w)]
    if kind == "diamond":
        return [(0, -1.1 * r), (0.72 * r, 0), (0, 1.1 * r), (-0.72 * r, 0)]
    if kind == "hexagon":
        return [(r * np.cos(t), r * np.sin(t)) for t in np.radians(np.arange(0, 360, 60))]
    raise ValueError(f"unknown shape {kind!r}")


def _mask(kind: str, centre: tuple[float, float], r: float, angle: float, digit_index: int) -> np.ndarray:
    """Anti-aliased coverage (H, W) in [0, 1] of one object."""
    s, size = _SUPERSAMPLE, IMAGE_SIZE * _SUPERSAMPLE
    cx, cy = centre[0] * s, centre[1] * s
    if kind in DIGITS:
        glyph = _digit_images()[0][digit_index]
        side = int(round(2.3 * r * s))
        big = np.asarray(Image.fromarray((glyph * 255).astype(np.uint8)).resize((side, side), Image.BICUBIC), np.float32) / 255
        big = np.clip((big - 0.3) / 0.3, 0, 1)  # crisp strokes from the blurry 8x8 sample
        canvas = np.zeros((size, size), np.float32)
        x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
        xs, ys = slice(max(x0, 0), min(x0 + side, size)), slice(max(y0, 0), min(y0 + side, size))
        canvas[ys, xs] = big[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
        img = Image.fromarray((canvas * 255).astype(np.uint8))
    else:
        img = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(img)
        poly = _shape_polygon(kind, r * s)
        if poly is None:
            draw.ellipse([cx - r * s, cy - r * s, cx + r * s, cy + r * s], fill=255)
        else:
            c, sn = np.cos(angle), np.sin(angle)
            draw.polygon([(cx + x * c - y * sn, cy + x * sn + y * c) for x, y in poly], fill=255)
    return np.asarray(img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX), np.float32) / 255.0


def _centres(scene: Scene, rng: np.random.Generator) -> list[tuple[float, float]]:
    j = lambda a: float(rng.uniform(-a, a))  # noqa: E731
    if scene.layout == "single":
        x, y = POSITIONS[scene.position][0]
        return [(x + j(5), y + j(5))]
    if scene.layout in ("h", "v"):
        along = (34 + j(6), 94 + j(6))
        across = (64 + j(12), 64 + j(12))
    else:
        along = (22 + j(2), 64 + j(3), 106 + j(2))
        across = tuple(64 + j(10) for _ in range(3))
    pts = list(zip(along, across))
    return pts if scene.layout in ("h", "row") else [(y, x) for x, y in pts]


def render(scene: Scene, rng: np.random.Generator, digit_indices: Sequence[int]) -> Image.Image:
    """Draw ``scene`` on a lightly textured canvas; ``digit_indices[i]`` picks the handwritten sample
    for the i-th thing when it is a digit."""
    base = np.array(_BACKGROUNDS[rng.integers(len(_BACKGROUNDS))], np.float32)
    coarse = rng.normal(0, 5, (8, 8)).astype(np.float32)
    texture = np.asarray(Image.fromarray(coarse).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC), np.float32)
    img = base[None, None, :] + texture[..., None] + rng.normal(0, 1.5, (IMAGE_SIZE, IMAGE_SIZE, 1)).astype(np.float32)
    for thing, centre, digit_index in zip(scene.things, _centres(scene, rng), digit_indices):
        r = SIZES[thing.size][0] * float(rng.uniform(0.92, 1.08))
        angle = float(np.radians(rng.uniform(-10, 10)))
        alpha = _mask(thing.kind, centre, r, angle, digit_index)[..., None]
        colour = np.array(COLOURS[thing.colour][0], np.float32) + rng.normal(0, 6, 3).astype(np.float32)
        img = img * (1 - alpha) + colour[None, None, :] * alpha
    return Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8), "RGB")


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------
@dataclass
class _ImageTask:
    split: str
    image_id: str
    scene: Scene
    render_seed: list[int]
    digit_indices: list[int]
    captions: list[str]
    voices: list[str]  # accent+variant per caption
    rates: list[int]
    pitches: list[int]


def _plan(counts: dict[str, int], seed: int, foreign_accents: bool = False) -> list[_ImageTask]:
    """Every random choice of the corpus, made here, in order."""
    scenes = sample_scenes(counts, seed)
    tasks = []
    for split, split_scenes in scenes.items():
        rng = np.random.default_rng([seed, SPLITS.index(split), 1])
        pool = voices_for(split, foreign_accents)
        for i, scene in enumerate(split_scenes):
            digits = []
            for thing in scene.things:
                options = digit_pool(thing.kind, split.startswith("test")) if thing.kind in DIGITS else [0]
                digits.append(int(options[rng.integers(len(options))]))
            texts = captions(scene, rng)
            voice_idx = rng.choice(len(pool), size=len(texts), replace=False)
            tasks.append(_ImageTask(
                split=split, image_id=f"{split}_{i:05d}", scene=scene, render_seed=[seed, SPLITS.index(split), 2, i],
                digit_indices=digits, captions=texts, voices=[pool[k] for k in voice_idx],
                rates=[int(x) for x in rng.integers(RATE_RANGE[0], RATE_RANGE[1] + 1, len(texts))],
                pitches=[int(x) for x in rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1, len(texts))],
            ))
    return tasks


@lru_cache(maxsize=2)
def _resampler(rate: int):
    """torchaudio's windowed-sinc resampler to 16 kHz (its kernel computed once per process)."""
    import torchaudio

    return torchaudio.transforms.Resample(rate, SAMPLE_RATE)


def _make_chunk(out_dir: str, tasks: list[_ImageTask]) -> list[dict]:
    """Draw and speak a chunk of images (in a worker process); returns their records."""
    import soundfile
    import torch

    torch.set_num_threads(1)
    out = Path(out_dir)
    records = []
    for task in tasks:
        image_rel = f"{task.split}/{task.image_id}.png"
        (out / "images" / task.split).mkdir(parents=True, exist_ok=True)
        (out / "audio" / task.split).mkdir(parents=True, exist_ok=True)
        render(task.scene, np.random.default_rng(task.render_seed), task.digit_indices).save(out / "images" / image_rel)
        for j, (text, voice, rate, pitch) in enumerate(zip(task.captions, task.voices, task.rates, task.pitches)):
            accent, variant = voice.split("+", 1)
            utt = synthesize(text, voice=accent, variant=variant, rate=rate, pitch=pitch)
            with torch.no_grad():
                wave = _resampler(utt.sample_rate)(torch.from_numpy(utt.audio)).numpy()
            utt_id = f"{task.image_id}_{j}"
            audio_rel = f"{task.split}/{utt_id}.flac"
            soundfile.write(out / "audio" / audio_rel, np.clip(wave, -1, 1), SAMPLE_RATE, subtype="PCM_16", format="FLAC")
            records.append({
                "utt_id": utt_id, "image_id": task.image_id, "image": image_rel, "audio": audio_rel, "text": text,
                "speaker": voice, "num_samples": int(len(wave)),
                "words": [[w, round(s, 4), round(e, 4)] for w, s, e in utt.words],
                "phones": [[p, round(s, 4), round(e, 4)] for p, s, e in utt.phones],
                "scene": task.scene.to_dict(), "tts": {"engine": "espeak-ng", "rate": rate, "pitch": pitch},
            })
    return records


def _map_chunks(out: Path, chunks: list[list[_ImageTask]], workers: int) -> Iterable[list[dict]]:
    """``_make_chunk`` over the chunks, in order, in ``workers`` processes (0: in this one).

    On Linux the workers are forked (instant start; like DataLoader workers they run torch on one
    thread, so a parent's OpenMP pool cannot hang them); elsewhere they are spawned.
    """
    if workers == 0:
        yield from (_make_chunk(str(out), chunk) for chunk in chunks)
        return
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        yield from pool.map(_make_chunk, [str(out)] * len(chunks), chunks)


def _disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


_IN_PROGRESS = ".generating"  # marks a folder this generator is (or was, if interrupted) writing


def _marker(size: str, seed: int, splits: Sequence[str] = SPLITS, foreign_accents: bool = False) -> dict[str, Any]:
    marker = {"name": NAME, "size": size, "seed": seed, "images": SIZES_PRESETS[size],
              "generator_version": GENERATOR_VERSION}
    if foreign_accents:  # absent otherwise, so corpora made before the option existed stay valid
        marker["foreign_accents"] = True
    if set(splits) != set(SPLITS):
        marker["splits"] = [s for s in SPLITS if s in splits]  # a part of the corpus, e.g. only its test split
    return marker


def _is_complete(out: Path, size: str, seed: int, splits: Sequence[str] = SPLITS,
                 foreign_accents: bool = False) -> bool | None:
    """True: a finished corpus of this size/seed holding ``splits``; False: one of another size/seed/voices;
    None: none, or a part of this one that lacks some of ``splits`` (it is regenerated)."""
    marker = out / "complete"
    if not marker.is_file():
        return None
    try:
        found = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    held = found.pop("splits", list(SPLITS))
    if found != _marker(size, seed, foreign_accents=foreign_accents):
        return False
    return True if set(splits) <= set(held) else None


def generate(out_dir: str | Path, size: str = "default", seed: int = 0, workers: int = 2, force: bool = False,
             splits: Sequence[str] = SPLITS, foreign_accents: bool = False) -> Path:
    """Write the spoken-scenes corpus of ``size`` (small | default | large) to ``out_dir``.

    Reuses ``out_dir`` if it already holds the finished corpus of this size and seed (the
    ``complete`` marker is written last). ``force`` regenerates over a corpus of another size/seed.
    ``splits`` writes only some splits, byte for byte as in the whole corpus (the test splits'
    scenes are drawn first, so they do not depend on the others): ``("test",)`` is enough to
    evaluate a model in a few minutes. ``foreign_accents`` adds foreign-accented voices to train and
    val (:func:`voices_for`); the test splits stay byte for byte the same.
    """
    if size not in SIZES_PRESETS:
        raise SyntheticCorpusError(f"unknown size {size!r}; choose one of {', '.join(SIZES_PRESETS)}")
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown or not splits:
        raise SyntheticCorpusError(f"unknown splits {unknown or list(splits)}; choose from {', '.join(SPLITS)}")
    if workers < 0:
        raise SyntheticCorpusError(f"workers must be 0 (in this process) or more, got {workers}")
    out = Path(out_dir).expanduser()
    state = _is_complete(out, size, seed, splits, foreign_accents)
    if state:
        log.info("%s already holds the %s synthetic corpus (seed %d); reusing it", out, size, seed)
        return out
    if state is False and not force:
        raise SyntheticCorpusError(f"{out} holds a synthetic corpus of another size, seed or voices; choose another "
                                   "folder or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise SyntheticCorpusError(f"{out} is a file; give a folder for the corpus")
    if out.is_dir() and any(out.iterdir()) and state is None and not (out / _IN_PROGRESS).exists() \
            and not (out / "complete").is_file():
        raise SyntheticCorpusError(f"{out} is not empty and holds no synthetic corpus; give a new or empty folder")
    for stale in ("complete", "corpus.json", "problems.json", *(f"{s}.jsonl" for s in SPLITS)):
        (out / stale).unlink(missing_ok=True)
    for stale in ("images", "audio", "cache"):  # cache: features of the corpus being replaced
        shutil.rmtree(out / stale, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / _IN_PROGRESS).write_text("")

    start = time.perf_counter()
    counts = SIZES_PRESETS[size]
    tasks = [t for t in _plan(counts, seed, foreign_accents) if t.split in splits]
    chunks = [tasks[i : i + CHUNK_IMAGES] for i in range(0, len(tasks), CHUNK_IMAGES)]
    records: dict[str, list[dict]] = {s: [] for s in counts if s in splits}
    with tqdm(total=sum(len(t.captions) for t in tasks), desc=f"synthetic {size}", unit="utt") as bar:
        for chunk_records in _map_chunks(out, chunks, workers):
            for rec in chunk_records:
                records[rec["image_id"].rsplit("_", 1)[0]].append(rec)
            bar.update(len(chunk_records))

    report = _report(records, size, seed, workers, time.perf_counter() - start, foreign_accents)
    write_corpus(out, Manifest(name=NAME, splits=records, image_root="images", audio_root="audio", report=report))
    report["disk_bytes"] = _disk_bytes(out)
    update_report(out, disk_bytes=report["disk_bytes"])
    (out / "complete").write_text(json.dumps(_marker(size, seed, splits, foreign_accents)))
    (out / _IN_PROGRESS).unlink()
    log.info("synthetic %s corpus (%s) in %s: %.0f s, %.1f MB, oracle R@1 %s", size, ", ".join(records), out,
             report["generation_seconds"], report["disk_bytes"] / 1e6, report["oracle_r1"])
    return out


def _report(records: dict[str, list[dict]], size: str, seed: int, workers: int, seconds: float,
            foreign_accents: bool = False) -> dict[str, Any]:
    durations = {s: [r["num_samples"] / SAMPLE_RATE for r in recs] for s, recs in records.items()}
    return {
        "generator": "s2i.datasets.synthetic", "generator_version": GENERATOR_VERSION, "size": size, "seed": seed,
        "workers": workers, "generation_seconds": round(seconds, 1),
        "oracle_r1": {s: round(oracle_recall(recs), 4) for s, recs in records.items() if s.startswith("test")},
        "voices": {"train": voices_for("train", foreign_accents), "test": voices_for("test")},
        "held_out": {"accents": list(TEST_ACCENTS), "variants": list(TEST_VARIANTS),
                     "colour_object_pairs": [list(p) for p in HELD_OUT_PAIRS]},
        "other_engines": "none: eSpeak NG only (Debian flite/festival are not used, so the corpus is the "
                         "same on every machine)",
        "rate_wpm": list(RATE_RANGE), "pitch": list(PITCH_RANGE),
        "audio_hours": {s: round(sum(d) / 3600, 3) for s, d in durations.items()},
        "mean_duration_s": {s: round(float(np.mean(d)), 3) for s, d in durations.items() if d},
        "vocabulary": sorted({w for recs in records.values() for r in recs for w in r["text"].split()}),
        "image_size": IMAGE_SIZE,
    }


# ---------------------------------------------------------------------------------------------
# A look at it
# ---------------------------------------------------------------------------------------------
def contact_sheet(corpus_dir: str | Path, out_png: str | Path, n: int = 12, split: str = "test") -> Path:
    """A grid of ``n`` images of ``split`` with one caption under each (for the docs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    info = read_corpus(corpus_dir)
    first: dict[str, dict] = {}
    for rec in read_split(info, split):
        first.setdefault(rec["image_id"], rec)
    chosen = list(first.values())[:n]
    cols = min(4, len(chosen))
    rows = -(-len(chosen) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, rec in zip(axes.flat, chosen):
        ax.imshow(Image.open(info.image_root / rec["image"]).convert("RGB"))
        ax.set_title("\n".join(textwrap.wrap(rec["text"], 30)), fontsize=9, y=-0.02, va="top")
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------------------------
# CLI: ``python -m s2i prepare synthetic ...`` (dispatched by s2i.datasets.prepare)
# ---------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder to write the corpus to (reused if already complete)")
    parser.add_argument("--size", choices=list(SIZES_PRESETS), default="default",
                        help="small: seconds, for tests; default: 5,000 train images; large: 20,000")
    parser.add_argument("--seed", type=int, default=0, help="the corpus is a pure function of size and seed")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="worker processes (default: every core; the corpus does not depend on it)")
    parser.add_argument("--force", action="store_true", help="replace a corpus of another size/seed in --out")
    parser.add_argument("--foreign-accents", action="store_true",
                        help="train/val voices also include eSpeak's Afrikaans, German and Dutch voices reading "
                             "English (foreign-accented English); the test splits are unchanged")
    parser.add_argument("--contact-sheet", default="", metavar="PNG", help="also draw a grid of sample scenes")
    parser.add_argument("--splits", default=",".join(SPLITS), metavar="LIST",
                        help="comma-separated splits to write (default: all); 'test' alone is enough to "
                             "evaluate a model, and is identical to the whole corpus's test split")


def run(args: argparse.Namespace) -> int:
    splits = [s.strip() for s in str(getattr(args, "splits", ",".join(SPLITS))).split(",") if s.strip()]
    out = generate(args.out, size=args.size, seed=args.seed, workers=args.workers, force=args.force, splits=splits,
                   foreign_accents=getattr(args, "foreign_accents", False))
    if getattr(args, "contact_sheet", ""):
        contact_sheet(out, args.contact_sheet)
    report = json.loads((out / "corpus.json").read_text())["report"]
    logging.getLogger(__name__).info("oracle R@1 %s; %.1f MB; generated in %s s", report["oracle_r1"],
                                     report.get("disk_bytes", 0) / 1e6, report["generation_seconds"])
    return 0


main = run
