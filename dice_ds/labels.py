"""Class names of the models' class ids: diffusers' ``id2label`` / ``labels`` / ``get_label_ids``.

Owns the name tables and the word -> id lookup. ImageNet-1k (every flavor with 1000 classes: the
DiT-MoE checkpoints are class-conditioned on it) reads ``dice_ds/assets/imagenet1k_classes.txt``:
line k is class k's comma-separated synonyms, the standard ImageNet-1k (ILSVRC-2012) class list
that diffusers' ``DiTPipeline`` gets as ``id2label`` ("great white shark, white shark, man-eater,
man-eating shark, Carcharodon carcharias" is class 2). The digits model's 10 classes are the digits:
class k is named by its word and its numeral ("seven, 7"). A model with another class count has
no names (``id2label`` None; ``get_label_ids`` says so in one line).

``word_index`` splits every name at its commas, as ``DiTPipeline.__init__`` does, so each synonym
is a word ("white shark" -> 2); a word two classes share (ImageNet has a few: "crane" is 134 and
517) keeps the higher id, as in diffusers (its dict is filled in id order).
"""

from __future__ import annotations

import os
from functools import cache

from dice_ds.config import ConfigError
from dice_ds.ds_config import ASSETS

IMAGENET_FILE = os.path.join(ASSETS, "imagenet1k_classes.txt")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@cache
def imagenet_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names (synonyms joined by ", "), index = class id."""
    with open(IMAGENET_FILE, encoding="utf-8") as f:
        names = tuple(line.rstrip("\n") for line in f)
    if len(names) != 1000 or not all(names):
        raise ConfigError(f"{IMAGENET_FILE}: {len(names)} lines, expected 1000 class names "
                          "(reinstall dice_ds)")
    return names


def id2label(model: str, num_classes: int) -> dict[int, str] | None:
    """{class id: comma-separated names} of a model (module docstring), or None."""
    if model == "digits" and num_classes == len(DIGIT_WORDS):
        return {k: f"{w}, {k}" for k, w in enumerate(DIGIT_WORDS)}
    if num_classes == 1000:
        return dict(enumerate(imagenet_names()))
    return None


def word_index(names: dict[int, str] | None) -> dict[str, int]:
    """{word: class id}, sorted by word (``DiTPipeline.labels``); empty without names."""
    words: dict[str, int] = {}
    for k, text in (names or {}).items():
        for word in text.split(","):
            words[word.strip()] = int(k)
    return dict(sorted(words.items()))


def label_ids(words: dict[str, int], label) -> list[int]:
    """The class ids of ``label`` (a word or a list of words); one ConfigError line naming the
    first word that is no class name."""
    if isinstance(label, str):
        label = [label]
    label = list(label)
    if not words:
        raise ConfigError("get_label_ids: this model's classes have no names (only ImageNet-1k "
                          "flavors and the digits model have them): pass class ids")
    for word in label:
        if word not in words:
            near = [w for w in words if isinstance(word, str) and word.lower() in w.lower()][:5]
            hint = f" (close: {', '.join(near)})" if near else ""
            raise ConfigError(f"get_label_ids: {word!r} is not a class name of this model{hint}; "
                              f"see pipe.labels for the {len(words)} names")
    return [words[w] for w in label]
