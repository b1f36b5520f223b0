"""segclip.runtime.labels: labels files, lists and prompts."""

from __future__ import annotations

import pytest

from segclip.runtime.errors import LabelFileError
from segclip.runtime.labels import load_labels, make_prompts, parse_labels, read_labels


def test_reads_labels_skipping_blanks_and_comments(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_bytes("\ufeff# classes\ncat\n\n  dog  \r\n#  ignored\npotted plant # keeps hash\n"
                     .encode("utf-8"))
    assert read_labels(path) == ("cat", "dog", "potted plant # keeps hash")


def test_accepts_a_list_and_a_path(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("cat\ndog\n", encoding="utf-8")
    assert load_labels(["cat", " dog "]) == ("cat", "dog")
    assert load_labels(str(path)) == load_labels(path) == ("cat", "dog")
    assert load_labels(("猫", "#1 fan")) == ("猫", "#1 fan")  # lists are literal: no comments


@pytest.mark.parametrize("content, message", [
    ("", r"holds no labels \(only blank lines or # comments\)"),
    ("# only\n\n   \n#comments\n", r"holds no labels \(only blank lines or # comments\)"),
    ("cat\ndog\nCat\n", r"line 3: duplicate label 'Cat' \(same as 'cat' at .* line 1"),
    ("big  cat\nbig cat\n", r"line 2: duplicate label 'big cat'"),
])
def test_bad_files_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "labels.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(LabelFileError, match=message) as info:
        read_labels(path)
    assert str(path) in str(info.value)


def test_non_utf8_file_names_the_line(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_bytes(b"cat\ndog\ncaf\xe9\n")
    with pytest.raises(LabelFileError, match=r"labels\.txt line 3 is not valid UTF-8 \(byte 0xe9"):
        read_labels(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(LabelFileError, match="does not exist"):
        read_labels(tmp_path / "nope.txt")
    with pytest.raises(LabelFileError, match="is a directory"):
        read_labels(tmp_path)


@pytest.mark.parametrize("labels, message", [
    ([], r"<list> holds no labels \(an empty list\)"),
    (["cat", "  "], r"labels\[1\] is empty"),
    (["cat", 3], r"labels\[1\]: labels must be strings, got int"),
    (["a\nb"], r"labels\[0\]: label 'a\\nb' spans several lines"),
    (["dog", "DOG"], r"labels\[1\]: duplicate label 'DOG'"),
])
def test_bad_lists(labels, message):
    with pytest.raises(LabelFileError, match=message):
        load_labels(labels)


def test_rejects_other_types():
    with pytest.raises(LabelFileError, match="got bytes"):
        load_labels(b"cat\ndog")
    with pytest.raises(LabelFileError, match="got int"):
        load_labels(3)


def test_too_many_labels():
    with pytest.raises(LabelFileError, match="65536 labels, more than the 65535"):
        parse_labels([f"l{i}" for i in range(65536)], file_rules=False)


def test_prompts_fill_the_template():
    assert make_prompts(["cat", "tv monitor"]) == ["a photo of a cat.", "a photo of a tv monitor."]
    assert make_prompts(["{x}"], "<{}> {y}") == ["<{x}> {y}"]  # other braces kept as they are


@pytest.mark.parametrize("template", ["a photo", "{} and {}", "a {0}"])
def test_bad_templates(template):
    with pytest.raises(LabelFileError, match="must contain exactly one {} placeholder"):
        make_prompts(["cat"], template)
