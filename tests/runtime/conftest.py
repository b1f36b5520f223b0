"""Fixtures of the runtime tests, built at test time (nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tokenizer.json built by the exporter's builder from open_clip's BPE vocabulary."""
    pytest.importorskip("regex")
    from segclip.export.tokenizer_file import default_bpe_path, write_tokenizer_file

    if not default_bpe_path().is_file():
        pytest.skip("open_clip (and its BPE vocabulary) is not installed")
    return write_tokenizer_file(tmp_path_factory.mktemp("bundle") / "tokenizer.json")
