"""Torch-free CLIP tokenizer reading the bundle's `tokenizer.json` (docs/architecture.md "Bundle
contract").

Equal, token for token, to `open_clip.tokenize(texts, context_length=C)` (the text tower of paper
§2.1 is CLIP's): the same cleaning (ftfy, html unescape twice, whitespace collapse, lower case),
open_clip's pre-tokenizer regex, byte-level BPE with `</w>` ends, `<start_of_text>` ...
`<end_of_text>`, zero padding, and truncation that keeps `<end_of_text>` as the last token.

The BPE and the regex run in the Hugging Face `tokenizers` library, from the file that
`segclip.export.tokenizer_file` writes. Cleaning runs here in Python because ftfy has no
`tokenizers` equivalent and Python's `str.lower` (final sigma, İ) differs from the library's.
Layouts: T texts, C context length.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import ftfy
import numpy as np

from segclip.runtime.contract import EOT_TOKEN, SOT_TOKEN
from segclip.runtime.errors import TokenizerError

if TYPE_CHECKING:
    import tokenizers

DEFAULT_CONTEXT_LENGTH = 77  # CLIP's text context at inference (docs/architecture.md "The model")
_CACHE_SIZE = 100_000  # pre-token -> ids entries kept before the cache is reset


def clean_text(text: str) -> str:
    """open_clip's `_clean_lower`: ftfy fix, html unescape (twice), collapse whitespace, lower."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).strip().lower()


@dataclass(frozen=True)
class TokenBatch:
    """Token ids of a batch of texts and what truncation did to them."""

    tokens: np.ndarray  # (T, C) int64: SOT, BPE ids, EOT, then zeros
    lengths: np.ndarray  # (T,) int64: tokens each text needs (SOT and EOT included), untruncated
    truncated: np.ndarray  # (T,) bool: lengths > C, so the text was cut (its EOT kept)


class Tokenizer:
    """CLIP BPE tokenizer over a `tokenizers.Tokenizer` loaded from `tokenizer.json`."""

    def __init__(self, hf_tokenizer: tokenizers.Tokenizer, source: str = "<memory>") -> None:
        """Wrap a loaded `tokenizers.Tokenizer`; prefer `Tokenizer.from_file`."""
        self._pre_tokenizer = hf_tokenizer.pre_tokenizer
        self._model = hf_tokenizer.model
        ids = {t: hf_tokenizer.token_to_id(t) for t in (SOT_TOKEN, EOT_TOKEN)}
        if self._pre_tokenizer is None or None in ids.values():
            raise TokenizerError(
                f"{source} is not a CLIP tokenizer: it lacks a pre-tokenizer or the tokens "
                f"{SOT_TOKEN} / {EOT_TOKEN}; rebuild the bundle with segclip-export onnx")
        self.sot_id: int = ids[SOT_TOKEN]
        self.eot_id: int = ids[EOT_TOKEN]
        self._special = {SOT_TOKEN: self.sot_id, EOT_TOKEN: self.eot_id}
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """Load `tokenizer.json` (raises `TokenizerError` naming the file when unreadable)."""
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if not path.is_file():
            raise TokenizerError(
                f"tokenizer file {path} does not exist; point at a bundle that has tokenizer.json "
                f"or rebuild it with segclip-export onnx")
        try:
            hf_tokenizer = HFTokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception on malformed JSON
            raise TokenizerError(
                f"cannot load tokenizer file {path}: {e}; rebuild the bundle with "
                f"segclip-export onnx") from e
        return cls(hf_tokenizer, source=str(path))

    def encode_text(self, text: str) -> list[int]:
        """BPE ids of one text without SOT/EOT (open_clip `SimpleTokenizer.encode`)."""
        cleaned = clean_text(text)
        try:
            pieces = self._pre_tokenizer.pre_tokenize_str(cleaned)
        except (TypeError, ValueError, UnicodeError) as e:
            raise TokenizerError(
                f"cannot tokenise {text!r}: {e}; remove unpaired surrogates or other "
                f"characters that are not valid Unicode text") from e
        ids: list[int] = []
        for piece, _ in pieces:
            special = self._special.get(piece)
            if special is not None:  # open_clip maps a pre-token equal to a special token to its id
                ids.append(special)
                continue
            cached = self._cache.get(piece)
            if cached is None:
                if len(self._cache) >= _CACHE_SIZE:  # bound memory in long-running processes
                    self._cache.clear()
                cached = self._cache[piece] = [t.id for t in self._model.tokenize(piece)]
            ids.extend(cached)
        return ids

    def encode(self, texts: str | Sequence[str],
               context_length: int = DEFAULT_CONTEXT_LENGTH) -> TokenBatch:
        """Tokenise `texts` to (T, C) int64 ids, with each text's untruncated length."""
        if isinstance(texts, str):
            texts = [texts]
        if context_length < 2:
            raise TokenizerError(
                f"context_length must be at least 2 (SOT and EOT), got {context_length}")
        tokens = np.zeros((len(texts), context_length), dtype=np.int64)  # (T, C)
        lengths = np.zeros(len(texts), dtype=np.int64)  # (T,)
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TokenizerError(f"texts must be strings, got {type(text).__name__}: {text!r}")
            ids = [self.sot_id, *self.encode_text(text), self.eot_id]
            lengths[row] = len(ids)
            if len(ids) > context_length:
                ids = ids[:context_length]
                ids[-1] = self.eot_id
            tokens[row, :len(ids)] = ids
        return TokenBatch(tokens=tokens, lengths=lengths, truncated=lengths > context_length)

    def __call__(self, texts: str | Sequence[str],
                 context_length: int = DEFAULT_CONTEXT_LENGTH) -> np.ndarray:
        """(T, C) int64 token ids, equal to `open_clip.tokenize(texts, context_length)`."""
        return self.encode(texts, context_length).tokens
