"""segclip.runtime.tokenizer: token-for-token equality with open_clip.tokenize, errors."""

from __future__ import annotations

import random

import numpy as np
import pytest

from segclip.runtime.errors import TokenizerError
from segclip.runtime.tokenizer import Tokenizer, clean_text

WORDS = ["cat", "dog", "photo", "aeroplane", "tv monitor", "potted plant", "traffic light",
         "person", "zebra", "the", "a", "of", "New York", "COVID-19", "e-mail", "U.S.A."]
PIECES = {
    "accents": ["café", "naïve", "Ångström", "façade", "Zürich", "São Paulo", "crème brûlée",
                "e\u0301", "A\u030a", "ǅemal", "İstanbul", "ΣΟΦΟΣ", "straße", "ſtrong", "Øre"],
    "emoji": ["😀", "👍🏽", "👨‍👩‍👧", "🇫🇷", "❤️", "🐱🐶", "☃", "🏳️‍🌈", "1️⃣", "✨✨"],
    "cjk": ["猫", "東京タワー", "한국어", "中文字符", "ｶﾀｶﾅ", "ひらがな", "犬と猫", "𠀀", "〇"],
    "scripts": ["кошка", "γάτα", "قطة", "חתול", "बिल्ली", "แมว", "ქართული", "Ꭰ", "ᚠᚢᚦ"],
    "punctuation": ["!", "?!", "...", "—", "–", "«»", "“quoted”", "‘single’", "(a)", "[b]",
                    "{c}", "#tag", "@user", "$5", "100%", "a/b", "a\\b", "<b>", "|", "~~", "§¶",
                    "`tick`", "^_^", ":-)", "•", "…", "¿qué?", "¡hola!"],
    "numbers": ["0", "42", "3.14159", "1,000,000", "2nd", "10th", "1e-9", "٣", "²", "½",
                "Ⅻ", "１２３", "0x1F", "-7", "+1", "2024-01-01", "12:30"],
    "html": ["&amp;", "&lt;cat&gt;", "&quot;dog&quot;", "&#39;s", "&#x27;", "&nbsp;", "&copy;",
             "&amp;amp;", "&amp;lt;", "&eacute;", "&hearts;", "&#128512;", "&unknown;", "& amp;"],
    "contractions": ["don't", "it's", "we'll", "I'M", "you've", "they'd", "I'd've", "can't",
                     "won't", "y'all", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "rock'n'roll",
                     "don’t", "DON'T", "O'Neil", "'ſ", "'S"],
    "whitespace": [" ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\u2028", "\u200b", "\ufeff",
                   "\u180e", "  ", "\x0b", "\x1c"],
    "mojibake": ["Ã©", "â€™", "Ã¼ber", "cafÃ©", "â€œhiâ€\x9d", "\x00", "\x07", "\ufffd",
                 "\ud83d\ude00", "a\ud800"],
    "special": ["<start_of_text>", "<end_of_text>", "<START_OF_TEXT>", "<end_of_text><end_of_text>",
                "!<start_of_text>", "<<end_of_text>", "<ſtart_of_text>", "<start_of_text",
                "<|endoftext|>", "</w>", "a</w>b"],
}


def generated_texts(count: int, seed: int = 0) -> list[str]:
    """`count` texts mixing the categories above, plain words and random code points."""
    rng = random.Random(seed)
    pool = [p for pieces in PIECES.values() for p in pieces] + WORDS
    texts = [p for pieces in PIECES.values() for p in pieces]  # every piece alone
    texts += ["", "   ", "\n\t ", "a photo of a cat.", "A PHOTO OF A CAT."]
    while len(texts) < count:
        parts = []
        for _ in range(rng.randint(1, 8)):
            roll = rng.random()
            if roll < 0.75:
                parts.append(rng.choice(pool))
            else:
                cp = rng.choice([rng.randint(0x20, 0x7E), rng.randint(0xA0, 0x2FFF),
                                 rng.randint(0x3000, 0xFFFF), rng.randint(0x10000, 0x10FFFF)])
                parts.append(chr(cp) if not 0xD800 <= cp <= 0xDFFF else "x")
        texts.append(rng.choice(["", " ", "  ", "\t", "-"]).join(parts))
    return texts


@pytest.fixture(scope="module")
def tokenizer(tokenizer_file) -> Tokenizer:
    return Tokenizer.from_file(tokenizer_file)


@pytest.fixture(scope="module")
def open_clip_tokenizer():
    tokenizer = pytest.importorskip("open_clip.tokenizer")
    return tokenizer


@pytest.mark.parametrize("context_length", [77, 8])
def test_equals_open_clip_on_generated_texts(tokenizer, open_clip_tokenizer, context_length):
    texts = generated_texts(1200, seed=context_length)
    expected = open_clip_tokenizer.tokenize(texts, context_length=context_length).numpy()
    ours = tokenizer(texts, context_length=context_length)
    assert ours.dtype == np.int64 and ours.shape == (len(texts), context_length)
    mismatched = [texts[i] for i in np.nonzero((ours != expected).any(axis=1))[0]]
    assert not mismatched, f"{len(mismatched)} texts differ, e.g. {mismatched[:5]!r}"


def test_equals_open_clip_on_random_code_points(tokenizer, open_clip_tokenizer):
    rng = random.Random(1)
    texts = ["".join(chr(c) for c in rng.sample(range(0x20, 0x30000), 6) if not 0xD800 <= c
                     <= 0xDFFF) for _ in range(400)]
    expected = open_clip_tokenizer.tokenize(texts, context_length=77).numpy()
    np.testing.assert_array_equal(tokenizer(texts), expected)


def test_long_text_truncation_keeps_eot(tokenizer, open_clip_tokenizer):
    long_text = " ".join(["a photo of a very long caption"] * 80)
    batch = tokenizer.encode([long_text, "a cat"], context_length=77)
    expected = open_clip_tokenizer.tokenize([long_text, "a cat"], context_length=77).numpy()
    np.testing.assert_array_equal(batch.tokens, expected)
    assert batch.tokens[0, -1] == tokenizer.eot_id
    assert batch.truncated.tolist() == [True, False]
    assert batch.lengths[0] == len(open_clip_tokenizer._tokenizer.encode(long_text)) + 2
    assert batch.lengths[1] == 4  # SOT a cat EOT


def test_truncated_flag_is_exact_at_the_boundary(tokenizer):
    text = "cat " * 5  # SOT + 5 + EOT = 7 tokens
    assert tokenizer.encode(text, context_length=7).truncated.tolist() == [False]
    assert tokenizer.encode(text, context_length=6).truncated.tolist() == [True]


def test_empty_and_special_texts(tokenizer):
    tokens = tokenizer(["", "<start_of_text>"], context_length=5)
    assert tokens[0].tolist() == [tokenizer.sot_id, tokenizer.eot_id, 0, 0, 0]
    assert tokens[1].tolist() == [tokenizer.sot_id, tokenizer.sot_id, tokenizer.eot_id, 0, 0]
    assert (tokenizer.sot_id, tokenizer.eot_id) == (49406, 49407)


def test_single_string_is_one_row(tokenizer):
    assert tokenizer("a photo of a cat.").shape == (1, 77)


def test_clean_text_mirrors_open_clip(open_clip_tokenizer):
    for text in generated_texts(300, seed=5):
        assert clean_text(text) == open_clip_tokenizer._clean_lower(text)


def test_rejects_non_string_and_short_context(tokenizer):
    with pytest.raises(TokenizerError, match="texts must be strings, got int"):
        tokenizer(["cat", 3])
    with pytest.raises(TokenizerError, match="context_length must be at least 2"):
        tokenizer("cat", context_length=1)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer.from_file(tmp_path / "tokenizer.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match=r"cannot load tokenizer file .*bad\.json"):
        Tokenizer.from_file(bad)


def test_rejects_a_tokenizer_without_clip_tokens(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    path = tmp_path / "tokenizer.json"
    HFTokenizer(models.BPE(vocab={"a": 0}, merges=[])).save(str(path))
    with pytest.raises(TokenizerError, match="is not a CLIP tokenizer"):
        Tokenizer.from_file(path)
