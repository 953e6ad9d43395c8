"""Written captions: a :class:`Tokenizer` (characters or words) and a :class:`TextEncoder` that embeds
them into the same space as speech and images (the seed's CMCL2022 text model).

The vocabulary (index -> token) is stored in ``TextConfig.vocab`` inside the model's config, so a
checkpoint is self-contained. Index 0 is padding and index 1 the unknown token: an unseen character
or word maps to 1 (the seed mapped unknown characters to -1, which indexed the last embedding row).
"""
from __future__ import annotations

import re
import string
from collections import Counter
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from s2i.config import ConfigError, TextConfig
from s2i.encoders.pooling import AttentionPooling
from s2i.encoders.rnn import bidirectional

PAD, UNK = "<pad>", "<unk>"
#: the fixed character set of char-level models (text is lower-cased first)
CHARACTERS = " " + string.ascii_lowercase + string.digits + string.punctuation
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)*")


def words(text: str) -> list[str]:
    """Lower-cased words with punctuation stripped (apostrophes inside words kept: ``don't``)."""
    return _WORD.findall(text.lower())


class Tokenizer:
    """Text -> padded index tensors, at the character or word level.

    ``Tokenizer.from_texts(captions, "word")`` builds a word vocabulary (most frequent first);
    ``Tokenizer.characters()`` the fixed character one. ``vocab`` is the index -> token list stored in
    the model config.
    """

    def __init__(self, vocab: list[str], level: str = "word", max_len: int = 128):
        if level not in ("word", "char"):
            raise ConfigError(f"text level {level!r}: choose 'word' or 'char'")
        if len(vocab) < 2 or vocab[0] != PAD or vocab[1] != UNK:
            raise ConfigError(f"a text vocabulary must start with {PAD!r}, {UNK!r}; got {vocab[:2]}")
        self.vocab, self.level, self.max_len = list(vocab), level, max_len
        self.index = {tok: i for i, tok in enumerate(self.vocab)}

    @classmethod
    def characters(cls, max_len: int = 128) -> "Tokenizer":
        return cls([PAD, UNK] + list(CHARACTERS), "char", max_len)

    @classmethod
    def from_texts(cls, texts: Iterable[str], level: str = "word", min_count: int = 1,
                   max_len: int = 128) -> "Tokenizer":
        """A vocabulary of the words seen at least ``min_count`` times (char level: the fixed set)."""
        if level == "char":
            return cls.characters(max_len)
        counts = Counter(w for t in texts for w in words(t))
        kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls([PAD, UNK] + kept, level, max_len)

    @staticmethod
    def build_vocab(texts: Iterable[str], arch: str = "word", min_count: int = 1) -> list[str]:
        """The index -> token list for ``TextConfig.vocab`` (``arch``: "word" or "char")."""
        return Tokenizer.from_texts(texts, arch, min_count).vocab

    def __len__(self) -> int:
        return len(self.vocab)

    def tokens(self, text: str) -> list[str]:
        return words(text) if self.level == "word" else list(text.lower())

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids (B, L) long, lengths (B,))``; an empty text becomes one unknown token."""
        rows = [[self.index.get(t, 1) for t in self.tokens(text)][: self.max_len] or [1] for text in texts]
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        ids = torch.zeros(len(rows), int(lengths.max()) if rows else 0, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        return ids, lengths

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        """Indices back to text (padding dropped): the inverse of ``encode`` on normalised text."""
        toks = [self.vocab[int(i)] for i in ids if int(i) != 0]
        return (" " if self.level == "word" else "").join(toks)


class TextEncoder(nn.Module):
    """Embedding -> bidirectional LSTM/GRU layers (padding unseen, :mod:`.rnn`) -> masked vectorial
    self-attention -> L2.

    As the seed's CMCL2022 model: the last layer has ``embed_dim // 2`` units per direction so its
    output is the shared embedding size; earlier layers have ``hidden_size``.
    """

    def __init__(self, vocab_size: int, embed_dim: int, *, token_dim: int = 300, hidden_size: int = 512,
                 num_layers: int = 2, rnn_type: str = "lstm", attention_hidden: int = 128):
        super().__init__()
        if embed_dim % 2:
            raise ConfigError(f"the text encoder needs an even embed_dim (two directions); got {embed_dim}")
        if rnn_type not in ("lstm", "gru"):
            raise ConfigError(f"text rnn_type {rnn_type!r}: choose 'lstm' or 'gru'")
        self.embed = nn.Embedding(vocab_size, token_dim, padding_idx=0)
        rnn = nn.LSTM if rnn_type == "lstm" else nn.GRU
        sizes = [hidden_size] * (num_layers - 1) + [embed_dim // 2]
        ins = [token_dim] + [2 * h for h in sizes[:-1]]
        self.rnns = nn.ModuleList(rnn(i, h, batch_first=True, bidirectional=True) for i, h in zip(ins, sizes))
        self.pooling = AttentionPooling(embed_dim, attention_hidden)
        self.out_dim = embed_dim

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``ids (B, L)``, ``lengths (B,)`` -> ``(B, embed_dim)`` L2-normalised."""
        h = self.embed(ids)
        lengths = lengths.to(h.device)
        for rnn in self.rnns:
            h = bidirectional(rnn, h, lengths)
        return F.normalize(self.pooling(h, lengths), dim=-1)


def build_text(cfg: TextConfig, embed_dim: int) -> tuple[Tokenizer, TextEncoder]:
    """The tokenizer and encoder a :class:`TextConfig` describes (its ``vocab`` must be filled)."""
    if cfg.arch == "char" and not cfg.vocab:
        cfg.vocab = Tokenizer.characters().vocab
    if not cfg.vocab:
        raise ConfigError("text.vocab is empty: build it from the training captions, e.g. "
                          "cfg.text.vocab = Tokenizer.from_texts(captions, 'word').vocab "
                          "(s2i.encoders.text), or set text=None for a model without text")
    tokenizer = Tokenizer(cfg.vocab, cfg.arch, cfg.max_len)
    encoder = TextEncoder(len(cfg.vocab), embed_dim, token_dim=cfg.embed_dim, hidden_size=cfg.hidden_size,
                          num_layers=cfg.num_layers, rnn_type=cfg.rnn_type)
    return tokenizer, encoder
