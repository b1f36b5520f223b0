"""segclip.export.tokenizer_file: the tokenizer.json builder (equality is in tests/runtime)."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from segclip.export.tokenizer_file import (
    NUM_MERGES,
    _class,
    clip_vocab,
    default_bpe_path,
    read_merges,
    write_tokenizer_file,
)
from segclip.runtime.errors import TokenizerError


def test_class_lists_ranges_and_singletons():
    points = np.array([0x41, 0x42, 0x43, 0x61, 0x1F600, 0x1F601], dtype=np.uint32)
    assert _class(points) == r"[\x{41}-\x{43}\x{61}\x{1F600}-\x{1F601}]"
    assert _class(np.array([0x5F], dtype=np.uint32)) == r"[\x{5F}]"


def test_vocab_matches_open_clip_encoder():
    if not default_bpe_path().is_file():
        pytest.skip("open_clip is not installed")
    merges = read_merges(default_bpe_path())
    vocab = clip_vocab(merges)
    assert len(merges) == NUM_MERGES and len(vocab) == 49408
    assert vocab["<start_of_text>"] == 49406 and vocab["<end_of_text>"] == 49407
    assert vocab["a</w>"] == 320 and vocab["cat</w>"] == 2368


def test_written_file_is_a_clip_bpe_tokenizer(tmp_path):
    if not default_bpe_path().is_file():
        pytest.skip("open_clip is not installed")
    first = write_tokenizer_file(tmp_path / "tokenizer.json")
    data = json.loads(first.read_text(encoding="utf-8"))
    assert data["model"]["type"] == "BPE" and data["model"]["end_of_word_suffix"] == "</w>"
    split, byte_level = data["pre_tokenizer"]["pretokenizers"]
    assert split["type"] == "Split" and split["invert"] and byte_level["use_regex"] is False
    assert [t["content"] for t in data["added_tokens"]] == ["<start_of_text>", "<end_of_text>"]
    assert not list(tmp_path.glob(".*.tmp"))  # the temp file was renamed away


def test_bad_merges_file_is_refused(tmp_path):
    bad = tmp_path / "bpe.txt.gz"
    with gzip.open(bad, "wt", encoding="utf-8") as handle:
        handle.write("#version\na b\nc d\n")
    with pytest.raises(TokenizerError, match=r"is not a CLIP BPE merges file: expected 48894"):
        read_merges(bad)
    with pytest.raises(TokenizerError, match="cannot read the CLIP BPE merges file"):
        read_merges(tmp_path / "missing.gz")
