"""Candidate labels and their prompts (paper §2.5 "Inference", docs/architecture.md
"Command contracts").

A labels file holds one label per line, UTF-8 (a leading BOM is allowed). Lines are stripped;
blank lines and lines starting with `#` are ignored (a `#` later in a line is part of the label).
Label i (1-based, in file order) is value i of the label map; 0 is background. Duplicates are
refused, compared as the tokenizer sees them (whitespace collapsed, case-folded), because two
labels with the same prompt could never both win. A Python list is taken literally: no comments,
and a blank item is an error. Prompts fill the template, by default the single official template
"a photo of a {}." (docs/official-implementation.md §4); other braces in the template are kept as
they are.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from segclip.runtime.contract import DEFAULT_TEMPLATE
from segclip.runtime.errors import LabelFileError

MAX_LABELS = 65535  # label maps are uint16 and 0 is background

LabelSource = str | os.PathLike | Sequence[str]


def _label_key(label: str) -> str:
    return " ".join(label.split()).casefold()


def parse_labels(lines: Iterable[str], source: str = "<labels>",
                 file_rules: bool = True) -> tuple[str, ...]:
    """Labels from lines of text, validated.

    Args:
        lines: the lines, with or without their line endings.
        source: name used in error messages (a path, or "<list>").
        file_rules: skip blank lines and `#` comments (a file); when False every item must be a
            label (a Python list) and is named `labels[i]` in messages.
    """
    labels: list[str] = []
    first_seen: dict[str, tuple[str, str]] = {}
    for index, line in enumerate(lines):
        where = f"{source} line {index + 1}" if file_rules else f"labels[{index}]"
        if not isinstance(line, str):
            raise LabelFileError(f"{where}: labels must be strings, got {type(line).__name__} "
                                 f"{line!r}")
        label = line.strip()
        if file_rules and (not label or label.startswith("#")):
            continue
        if not label:
            raise LabelFileError(f"{where} is empty ({line!r}); give a non-blank label")
        if "\n" in label or "\r" in label:
            raise LabelFileError(f"{where}: label {label!r} spans several lines; give one label "
                                 f"per item")
        key = _label_key(label)
        if key in first_seen:
            first_where, previous = first_seen[key]
            raise LabelFileError(
                f"{where}: duplicate label {label!r} (same as {previous!r} at {first_where}; "
                f"labels are compared ignoring case and repeated spaces); remove one")
        first_seen[key] = (where, label)
        labels.append(label)
    if not labels:
        what = "only blank lines or # comments" if file_rules else "an empty list"
        raise LabelFileError(f"{source} holds no labels ({what}); give at least one label")
    if len(labels) > MAX_LABELS:
        raise LabelFileError(f"{source} holds {len(labels)} labels, more than the {MAX_LABELS} a "
                             f"uint16 label map can number; split the label set")
    return tuple(labels)


def read_labels(path: str | os.PathLike) -> tuple[str, ...]:
    """Labels of a UTF-8 labels file (one per line; blank lines and `#` comments ignored)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise LabelFileError(f"labels file {path} does not exist; check the path") from e
    except IsADirectoryError as e:
        raise LabelFileError(f"labels path {path} is a directory; pass a text file") from e
    except OSError as e:
        raise LabelFileError(f"cannot read labels file {path}: {e}") from e
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise LabelFileError(
            f"{path} line {line} is not valid UTF-8 (byte {data[e.start]:#04x} at offset "
            f"{e.start}); save the file as UTF-8") from e
    return parse_labels(text.split("\n"), source=str(path))


def load_labels(labels: LabelSource) -> tuple[str, ...]:
    """Labels from a file path (str or PathLike) or from a sequence of label strings."""
    if isinstance(labels, (str, os.PathLike)):
        return read_labels(labels)
    if isinstance(labels, (bytes, bytearray)) or not isinstance(labels, Sequence):
        raise LabelFileError(f"labels must be a file path or a list of strings, got "
                             f"{type(labels).__name__}")
    return parse_labels(labels, source="<list>", file_rules=False)


def make_prompts(labels: Sequence[str], template: str = DEFAULT_TEMPLATE) -> list[str]:
    """One prompt per label: `template` with its single "{}" replaced by the label."""
    if template.count("{}") != 1:
        raise LabelFileError(f"prompt template {template!r} must contain exactly one {{}} "
                             f"placeholder for the label, e.g. {DEFAULT_TEMPLATE!r}")
    before, after = template.split("{}")
    return [f"{before}{label}{after}" for label in labels]
