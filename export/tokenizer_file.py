"""Build the bundle's `tokenizer.json` from open_clip's CLIP BPE (docs/architecture.md "Bundle
contract").

The runtime tokenises without torch through the Hugging Face `tokenizers` library
(`segclip.runtime.tokenizer`); this module writes the file it reads, so that the pair equals
`open_clip.tokenize` token for token (paper §2.1 uses the CLIP text tower unchanged).

What the file holds, mirroring `open_clip.tokenizer.SimpleTokenizer`:
- model: byte-level BPE, vocab = 256 byte symbols + the same with `</w>` + the first 48,894 merges
  of `bpe_simple_vocab_16e6.txt.gz` + `<start_of_text>`, `<end_of_text>` (49,408 ids);
  `end_of_word_suffix="</w>"`.
- pre-tokenizer: open_clip's regex (special tokens | contractions | letters+ | one digit |
  other symbols+, case-insensitive), then the GPT-2 byte-to-unicode map. The regex is written with
  explicit code-point classes computed here with the `regex` module that open_clip itself uses, so
  the Rust regex engine's Unicode tables (older than `regex`'s) never decide what a letter is.
- post-processor `<start_of_text> $A <end_of_text>` and the special tokens as added tokens, for
  other consumers of the file. The segclip runtime does not use them: it cleans text in Python
  (ftfy, html, whitespace, lower case cannot be expressed as `tokenizers` normalizers), maps the
  pre-tokens that are exactly a special token to its id as open_clip does, and truncates itself.

open_clip is located without importing it (importing it imports torch).
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from segclip.runtime._atomic import atomic_write_bytes
from segclip.runtime.contract import EOT_TOKEN, SOT_TOKEN
from segclip.runtime.errors import TokenizerError

if TYPE_CHECKING:
    import tokenizers

from segclip.errors import MissingDependencyError

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # open_clip keeps merges[1 : 49152 - 256 - 2 + 1]
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
END_OF_WORD = "</w>"


def default_bpe_path() -> Path:
    """The BPE merges file shipped with the installed open_clip (`open_clip_torch`)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            "open_clip is not installed, so its BPE vocabulary cannot be found; install it with "
            "pip install 'segclip[train]' or pass bpe_path=<bpe_simple_vocab_16e6.txt.gz>")
    return Path(next(iter(spec.submodule_search_locations))) / BPE_FILE


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible map from the 256 byte values to printable unicode characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def read_merges(bpe_path: str | os.PathLike) -> list[tuple[str, str]]:
    """The merges open_clip uses, in rank order."""
    try:
        lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise TokenizerError(
            f"cannot read the CLIP BPE merges file {bpe_path}: {e}; pass the "
            f"{BPE_FILE} shipped with open_clip") from e
    merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise TokenizerError(
            f"{bpe_path} is not a CLIP BPE merges file: expected {NUM_MERGES} pairs after the "
            f"header, found {len(merges)}; pass the {BPE_FILE} shipped with open_clip")
    return merges  # type: ignore[return-value]


def clip_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Token -> id exactly as `SimpleTokenizer.encoder`."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + END_OF_WORD for s in symbols] + ["".join(m) for m in merges]
    tokens += [SOT_TOKEN, EOT_TOKEN]
    return {token: index for index, token in enumerate(tokens)}


def _code_points() -> np.ndarray:
    """(1,112,064,) uint32: every Unicode scalar value (surrogates excluded)."""
    return np.concatenate([np.arange(0xD800), np.arange(0xE000, 0x110000)]).astype("<u4")


def _class(code_points: np.ndarray) -> str:
    """An Oniguruma character class listing sorted `code_points` as \\x{..} ranges."""
    breaks = np.nonzero(np.diff(code_points.astype(np.int64)) != 1)[0]
    firsts = np.concatenate([code_points[:1], code_points[breaks + 1]])
    lasts = np.concatenate([code_points[breaks], code_points[-1:]])
    parts = [f"\\x{{{a:X}}}" if a == b else f"\\x{{{a:X}}}-\\x{{{b:X}}}"
             for a, b in zip(firsts.tolist(), lasts.tolist())]
    return "[" + "".join(parts) + "]"


def clip_pretokenizer_pattern() -> str:
    """open_clip's `SimpleTokenizer.pat` with every class and case variant spelled out.

    Each character class and each literal character (case-insensitively, as open_clip compiles
    it) is replaced by the explicit set of code points the `regex` module matches for it, so any
    regex engine that honours \\x{..} ranges and leftmost-first alternation splits identically.
    """
    try:
        import regex
    except ImportError as e:
        raise MissingDependencyError(
            "building tokenizer.json needs the `regex` module that open_clip uses; install it "
            "with pip install 'segclip[train]'") from e
    code_points = _code_points()
    alphabet = code_points.tobytes().decode("utf-32-le")

    def matched(pattern: str) -> str:
        """The class of the characters `pattern` (one character long) matches, as open_clip."""
        rest = regex.sub(pattern, "", alphabet, flags=regex.IGNORECASE)
        unmatched = np.frombuffer(rest.encode("utf-32-le"), dtype="<u4")
        return _class(np.setdiff1d(code_points, unmatched, assume_unique=True))

    def literal(text: str) -> str:
        """Each character as the class of its case variants (few, so `findall` is cheap)."""
        found = (regex.findall(regex.escape(c), alphabet, flags=regex.IGNORECASE) for c in text)
        return "".join(_class(np.unique(np.array([ord(v) for v in f], np.uint32))) for f in found)

    alternatives = [literal(t) for t in (SOT_TOKEN, EOT_TOKEN, *CONTRACTIONS)]
    alternatives += [matched(r"[\p{L}]") + "+", matched(r"[\p{N}]"),
                     matched(r"[^\s\p{L}\p{N}]") + "+"]
    return "|".join(alternatives)


def build_tokenizer(bpe_path: str | os.PathLike | None = None) -> tokenizers.Tokenizer:
    """The CLIP tokenizer as a `tokenizers.Tokenizer` (see the module docstring for its parts)."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )

    merges = read_merges(bpe_path or default_bpe_path())
    vocab = clip_vocab(merges)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, end_of_word_suffix=END_OF_WORD,
                                     fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(clip_pretokenizer_pattern()), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.Sequence([decoders.BPEDecoder(suffix=END_OF_WORD),
                                           decoders.ByteLevel()])
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in (SOT_TOKEN, EOT_TOKEN)])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{SOT_TOKEN} $A {EOT_TOKEN}",
        special_tokens=[(SOT_TOKEN, vocab[SOT_TOKEN]), (EOT_TOKEN, vocab[EOT_TOKEN])])
    return tokenizer


def write_tokenizer_file(path: str | os.PathLike,
                         bpe_path: str | os.PathLike | None = None) -> Path:
    """Build the CLIP tokenizer and write it atomically to `path` (bundle/tokenizer.json)."""
    text = build_tokenizer(bpe_path).to_str(pretty=False)
    return atomic_write_bytes(path, text.encode("utf-8"))
