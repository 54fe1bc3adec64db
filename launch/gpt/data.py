"""Training data for the launcher: a text corpus generated deterministically, and a word tokenizer.

Nothing is downloaded and nothing is shipped: `generate_corpus` writes English-looking text from a
fixed-seed random "language" (a lexicon of pseudo-words built from syllables, a Zipfian word
frequency, and a sparse word-to-word transition table), so the same seed gives the same text, byte
for byte, on every machine and every rank. The text has real structure to learn (each word is
mostly followed by one of a few likely successors, sentences end with a period), so a language
model's loss falls quickly from log(V) towards the entropy of that process.

`WordTokenizer` splits text into words and punctuation and numbers them by frequency, so the
vocabulary is as large as the lexicon (8,000 words by default on CPU, 32,000 on GPU): large enough
that the output layer and the loss dominate a tiny model's memory, which is what the fused loss
is about. `load_text_file` does the same for a text file of your own (`--corpus PATH`). `load` builds the
corpus a run asks for and checks it against the model's sizes.
"""

from __future__ import annotations

import bisect
import itertools
import math
import os
import random
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass

import torch

from .args import UsageError

_ONSETS = ["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w",
           "z", "br", "ch", "cl", "dr", "fl", "gr", "pl", "sh", "st", "th", "tr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ee", "io", "oo", "ou"]
_CODAS = ["", "", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng"]

_TOKEN_RE = re.compile(r"[A-Za-z0-9']+|[^\sA-Za-z0-9']")


def _lexicon(n_words: int, rng: random.Random) -> list[str]:
    """`n_words` distinct pseudo-words of 1-4 syllables (short words more likely, as in English)."""
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < n_words:
        n_syl = rng.choices((1, 2, 3), weights=(4, 5, 2))[0]
        w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(n_syl))
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words


def generate_corpus(n_words: int = 8000, n_tokens: int = 400_000, seed: int = 1234,
                    successors: int = 6, follow_p: float = 0.85, zipf_s: float = 1.1) -> str:
    """Deterministic text of about `n_tokens` tokens over a lexicon of `n_words` pseudo-words.

    Word i has Zipf weight 1/(i+1)^zipf_s. Each word has `successors` favourite next words (half
    drawn from the Zipf law, half uniformly); with probability `follow_p` the next word is one of them (weights 8:4:2:1:…),
    otherwise it is drawn from the Zipf law. Sentences of 4-24 words end with '.', with a ',' now
    and then. Only Python's `random.Random(seed)` is used, whose stream is stable across versions.
    """
    if n_words < 16:
        raise ValueError(f"n_words: expected at least 16, got {n_words}")
    if n_tokens < 1000:
        raise ValueError(f"n_tokens: expected at least 1000, got {n_tokens}")
    rng = random.Random(seed)
    words = _lexicon(n_words, rng)
    zipf = list(itertools.accumulate(1.0 / (i + 1) ** zipf_s for i in range(n_words)))
    total = zipf[-1]

    def draw() -> int:
        return min(bisect.bisect_left(zipf, rng.random() * total), n_words - 1)

    # Favourite successors: half from the Zipf law, half uniform, so that rare words occur too.
    follow = [[draw() if k % 2 == 0 else rng.randrange(n_words) for k in range(successors)]
              for _ in range(n_words)]
    follow_cum = list(itertools.accumulate(2.0 ** (successors - k) for k in range(successors)))

    out: list[str] = []
    prev = draw()
    produced = 0
    while produced < n_tokens:
        length = rng.randint(4, 24)
        sentence = []
        for k in range(length):
            if rng.random() < follow_p:
                j = bisect.bisect_left(follow_cum, rng.random() * follow_cum[-1])
                cur = follow[prev][min(j, successors - 1)]
            else:
                cur = draw()
            sentence.append(words[cur])
            if 0 < k < length - 1 and rng.random() < 0.06:
                sentence.append(",")
            prev = cur
        sentence.append(".")
        produced += len(sentence)
        out.append(" ".join(sentence))
    return "\n".join(out) + "\n"


# Text may hold tabs, line and page breaks; other control characters are rare in text and common in
# binary data: a file with more than this fraction of them (or any NUL byte) is refused.
MAX_CONTROL_FRACTION = 0.01
_TEXT_CONTROLS = set("\t\n\r\f\v")


def load_text_file(path: str) -> str:
    """The UTF-8 text of `path` (a leading byte-order mark dropped); UsageError naming --corpus for
    a missing, unreadable, empty or non-text file (NUL bytes, invalid UTF-8, or more than
    MAX_CONTROL_FRACTION control characters other than tab and line/page breaks)."""
    where = f"--corpus {path}"
    if os.path.isdir(path):
        raise UsageError(f"{where}: is a folder, expected a UTF-8 text file")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise UsageError(f"{where}: no such file") from None
    except OSError as exc:
        raise UsageError(f"{where}: cannot read it ({exc.strerror or exc})") from None
    if not raw:
        raise UsageError(f"{where}: the file is empty, expected UTF-8 text")
    if b"\0" in raw:
        raise UsageError(f"{where}: not text (NUL byte at offset {raw.index(0)}), expected a UTF-8 text file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{where}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start} is "
                         f"invalid), expected a UTF-8 text file") from None
    controls = sum(1 for ch in text if unicodedata.category(ch) == "Cc" and ch not in _TEXT_CONTROLS)
    if controls > MAX_CONTROL_FRACTION * len(text):
        raise UsageError(f"{where}: not text ({controls} of its {len(text)} characters are control characters), "
                         f"expected a UTF-8 text file")
    return text


def split_words(text: str) -> list[str]:
    """Words (letters, digits, apostrophes; lower-cased) and single punctuation characters."""
    return [t.lower() for t in _TOKEN_RE.findall(text)]


@dataclass
class WordTokenizer:
    """Word-level tokenizer: id 0 is <unk>; other ids by decreasing frequency (ties alphabetical)."""

    vocab: list[str]

    UNK = "<unk>"

    @classmethod
    def fit(cls, text: str, max_size: int | None = None) -> "WordTokenizer":
        counts = Counter(split_words(text))
        ordered = sorted(counts, key=lambda w: (-counts[w], w))
        if max_size is not None:
            ordered = ordered[: max(0, max_size - 1)]
        return cls([cls.UNK] + ordered)

    def __post_init__(self) -> None:
        self._index = {w: i for i, w in enumerate(self.vocab)}

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self._index.get(w, 0) for w in split_words(text)], dtype=torch.int64)

    def decode(self, ids) -> str:
        return " ".join(self.vocab[int(i)] for i in ids)


@dataclass
class Corpus:
    ids: torch.Tensor  # int64 [n_tokens]
    tokenizer: WordTokenizer
    description: str


def build_corpus(corpus_path: str | None, n_words: int, n_tokens: int, seed: int,
                 max_vocab: int | None = None) -> Corpus:
    """Generate (or read) the text, fit the tokenizer on it and encode it."""
    if corpus_path:
        text = load_text_file(corpus_path)
        desc = f"text file {corpus_path}"
    else:
        text = generate_corpus(n_words=n_words, n_tokens=n_tokens, seed=seed)
        desc = (f"generated deterministically by launch/gpt/data.py (seed {seed}, lexicon of {n_words} "
                f"pseudo-words, ~{n_tokens} tokens)")
    tok = WordTokenizer.fit(text, max_vocab)
    ids = tok.encode(text)
    return Corpus(ids=ids, tokenizer=tok, description=desc)


class BatchSampler:
    """Random windows of `seq_len + 1` tokens; the same seed gives the same batches in every run.

    Each data-parallel rank draws its own windows (seed mixed with its dp rank); the tensor-parallel
    ranks of one model replica draw the same ones.
    """

    def __init__(self, ids: torch.Tensor, seq_len: int, micro_batch: int, seed: int, dp_rank: int = 0):
        if ids.numel() < seq_len + 2:
            raise ValueError(f"the corpus has {ids.numel()} tokens, fewer than seq_len + 2 = {seq_len + 2}")
        self.ids, self.seq_len, self.micro_batch = ids, seq_len, micro_batch
        self.gen = torch.Generator().manual_seed(seed * 1_000_003 + dp_rank)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [b, s], labels [b, s]) with labels the tokens shifted by one."""
        starts = torch.randint(0, self.ids.numel() - self.seq_len - 1, (self.micro_batch,), generator=self.gen)
        win = torch.stack([self.ids[s: s + self.seq_len + 1] for s in starts.tolist()])
        return win[:, :-1].contiguous(), win[:, 1:].contiguous()


def load(cfg: dict, vocab_size_arg: int | None) -> Corpus:
    """The run's corpus; sets cfg's vocab_size, padded_vocab_size (a multiple of 128 x tp, as
    Megatron pads), data and corpus_size. UsageError when the data does not fit the sizes."""
    corpus = build_corpus(cfg["corpus"], cfg["lexicon"], cfg["corpus_tokens"], cfg["data_seed"])
    need = cfg["seq_len"] + 2  # BatchSampler's windows of seq_len + 1 tokens start in [0, n − seq_len − 1)
    if corpus.ids.numel() < need:
        what = f"--corpus {cfg['corpus']}" if cfg["corpus"] else f"--corpus-tokens {cfg['corpus_tokens']}"
        raise UsageError(f"{what}: the text has {corpus.ids.numel()} tokens (words and punctuation), too few for "
                         f"one sequence of --seq-len {cfg['seq_len']}: expected at least {need}")
    n_ids = int(corpus.ids.max()) + 1
    vocab = vocab_size_arg if vocab_size_arg is not None else len(corpus.tokenizer)
    if vocab < n_ids:
        raise UsageError(f"--vocab-size {vocab} is smaller than the data's ids (the tokenizer produces ids up to "
                         f"{n_ids - 1}); use --vocab-size >= {n_ids} or leave it out")
    multiple = 128 * cfg["tp"]
    cfg.update(vocab_size=vocab, padded_vocab_size=math.ceil(vocab / multiple) * multiple,
               data=corpus.description, corpus_size=corpus.ids.numel())
    return corpus
