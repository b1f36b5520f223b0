"""Captions for the synthetic shapes world: many templates, words from the actual layout.

A caption names every visible shape class exactly once, with its instance count ("a red circle",
"two green triangles"), never the background. Position words come from the centroid of the
visible pixels (thirds of the image), relations ("to the left of", "above") from the centroid
difference of two single instances.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

NUMBER_WORDS = {2: "two", 3: "three"}
RELATION_MARGIN = 0.15  # centroid difference (fraction of the side) needed to state a relation

FRAMES = (
    "{objs}",
    "{objs}.",
    "a picture of {objs}",
    "a photo of {objs}",
    "an image of {objs}",
    "there {be} {objs}",
    "this image shows {objs}",
    "we can see {objs}",
    "{objs} in the picture",
    "a drawing of {objs}",
    "a simple drawing with {objs}",
    "some coloured shapes: {objs}",
)

POSITION_PHRASES = {
    ("left", "middle"): ("on the left", "at the left"),
    ("right", "middle"): ("on the right", "at the right"),
    ("centre", "top"): ("at the top", "near the top"),
    ("centre", "bottom"): ("at the bottom", "near the bottom"),
    ("centre", "middle"): ("in the middle", "in the centre"),
    ("left", "top"): ("in the top left corner", "at the top left"),
    ("right", "top"): ("in the top right corner", "at the top right"),
    ("left", "bottom"): ("in the bottom left corner", "at the bottom left"),
    ("right", "bottom"): ("in the bottom right corner", "at the bottom right"),
}


class Mention(NamedTuple):
    """One visible shape instance: its class name and the centroid of its visible pixels."""

    name: str  # "red circle"
    x: float  # centroid, fraction of the width in [0, 1]
    y: float  # centroid, fraction of the height in [0, 1]


def position_words(x: float, y: float) -> tuple[str, str]:
    """(column, row) of a point given as fractions of the side: thirds of the image."""
    column = "left" if x < 1 / 3 else "right" if x > 2 / 3 else "centre"
    row = "top" if y < 1 / 3 else "bottom" if y > 2 / 3 else "middle"
    return column, row


def noun_phrase(name: str, count: int) -> str:
    """'a red circle', 'an orange star', 'two green triangles' (count 1..3)."""
    if count == 1:
        article = "an" if name[0] in "aeiou" else "a"
        return f"{article} {name}"
    if count not in NUMBER_WORDS:
        raise ValueError(f"count must be 1..3, got {count}")
    return f"{NUMBER_WORDS[count]} {name}s"


def join_phrases(phrases: Sequence[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _relation(a: Mention, b: Mention) -> str | None:
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= abs(dy) and abs(dx) > RELATION_MARGIN:
        return "to the left of" if dx < 0 else "to the right of"
    if abs(dy) > RELATION_MARGIN:
        return "above" if dy < 0 else "below"
    return None


def _choice(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _phrases(
    groups: dict[str, list[Mention]], rng: np.random.Generator, positions: bool
) -> list[str]:
    phrases = []
    for name, members in groups.items():
        phrase = noun_phrase(name, len(members))
        if positions and len(members) == 1 and rng.random() < 0.7:
            where = POSITION_PHRASES[position_words(members[0].x, members[0].y)]
            phrase = f"{phrase} {_choice(rng, where)}"
        phrases.append(phrase)
    return phrases


def describe(mentions: Sequence[Mention], rng: np.random.Generator) -> str:
    """A caption naming every class in `mentions` once, with its count; style drawn from `rng`."""
    if not mentions:
        raise ValueError("a caption needs at least one shape")
    order = [mentions[i] for i in rng.permutation(len(mentions))]
    groups: dict[str, list[Mention]] = {}
    for mention in order:
        groups.setdefault(mention.name, []).append(mention)
    counts = Counter({name: len(members) for name, members in groups.items()})
    singles = [members[0] for members in groups.values() if len(members) == 1]
    style = rng.random()
    if style < 0.25 and len(singles) >= 2:
        first, second = singles[0], singles[1]
        relation = _relation(first, second)
        if relation is not None:
            text = f"{noun_phrase(first.name, 1)} {relation} {noun_phrase(second.name, 1)}"
            rest = {n: m for n, m in groups.items() if n not in (first.name, second.name)}
            if rest:
                text += " and " + join_phrases(_phrases(rest, rng, positions=False))
            return text
    if style < 0.35 and len(groups) == 1 and len(singles) == 1:
        where = POSITION_PHRASES[position_words(singles[0].x, singles[0].y)]
        return f"{_choice(rng, where)} there is {noun_phrase(singles[0].name, 1)}"
    objs = join_phrases(_phrases(groups, rng, positions=style < 0.6))
    be = "is" if counts[next(iter(groups))] == 1 else "are"
    return _choice(rng, FRAMES).format(objs=objs, be=be)
