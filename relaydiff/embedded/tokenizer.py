"""A CLIP BPE vocabulary built locally from the world's caption vocabulary.

Nothing can be downloaded here, so the tokenizer files (``vocab.json``/``merges.txt`` in the
CLIP format, ``</w>`` end-of-word suffix) are generated: all 256 byte characters (with and
without ``</w>``) so nothing is out of vocabulary, then BPE merges learned on the word list
until every grammar word is one token, then ``<|startoftext|>`` and ``<|endoftext|>``.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"  # also used as pad and unk, as in Stable Diffusion 1.x
WORD_SUFFIX = "</w>"


def _bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable character table of GPT-2/CLIP BPE."""
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    return bytes_to_unicode()


def _symbols(word: str, byte_encoder: dict[int, str]) -> list[str]:
    chars = [byte_encoder[b] for b in word.encode("utf-8")]
    return chars[:-1] + [chars[-1] + WORD_SUFFIX]


def learn_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """Learn BPE merges on ``words`` until each word is a single symbol.

    Plain greedy BPE (most frequent pair first, ties broken lexicographically) written here
    because the corpus is a few dozen words; ranks applied in order reproduce the training
    segmentation, so every word encodes to one token.
    """
    byte_encoder = _bytes_to_unicode()
    vocab_words = sorted({w.lower() for w in words if w})
    for w in vocab_words:
        if any(c.isspace() for c in w):
            raise ValueError(f"vocabulary entry {w!r} contains whitespace")
    segs = [_symbols(w, byte_encoder) for w in vocab_words]
    merges: list[tuple[str, str]] = []
    while True:
        counts: Counter[tuple[str, str]] = Counter()
        for seg in segs:
            for pair in zip(seg, seg[1:]):
                counts[pair] += 1
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        new_segs = []
        for seg in segs:
            out: list[str] = []
            i = 0
            while i < len(seg):
                if i < len(seg) - 1 and (seg[i], seg[i + 1]) == best:
                    out.append(seg[i] + seg[i + 1])
                    i += 2
                else:
                    out.append(seg[i])
                    i += 1
            new_segs.append(out)
        segs = new_segs


def write_clip_bpe_files(words: Iterable[str], directory: Path) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` (CLIP format) covering ``words``."""
    byte_encoder = _bytes_to_unicode()
    merges = learn_merges(words)
    tokens = list(byte_encoder.values())
    tokens += [t + WORD_SUFFIX for t in tokens]
    tokens += ["".join(m) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab: dict[str, int] = {}
    for tok in tokens:
        vocab.setdefault(tok, len(vocab))
    directory.mkdir(parents=True, exist_ok=True)
    vocab_file = directory / "vocab.json"
    merges_file = directory / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_file.write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    return vocab_file, merges_file


def build_tokenizer(words: Iterable[str], directory: Path, max_length: int) -> "CLIPTokenizer":
    """Build a ``CLIPTokenizer`` over ``words`` and save it (``save_pretrained``) in ``directory``.

    Args:
        words: every word captions can contain (``relaydiff.world.vocabulary()``).
        directory: the ``tokenizer/`` folder of a family.
        max_length: ``model_max_length``, equal to the text encoder's position count.
    """
    from transformers import CLIPTokenizer

    if max_length < 4:
        raise ValueError(f"max_length must be >= 4, got {max_length!r}")
    vocab_file, merges_file = write_clip_bpe_files(words, directory)
    tok = CLIPTokenizer(
        vocab_file=str(vocab_file),
        merges_file=str(merges_file),
        model_max_length=max_length,
    )
    tok.save_pretrained(str(directory))
    return tok
