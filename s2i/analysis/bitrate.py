"""Bitrate of a discrete speech code, as the ZeroSpeech 2019 challenge defines it.

``bitrate = (number of symbols / total duration in seconds) * H``, where ``H`` is the entropy (bits) of
the distribution of symbols over the whole set. A code that spends many frames per second on many
equally used symbols costs many bits; the challenge wants low ABX error *at* a low bitrate.

The run-length variant first merges repeated codes (``7 7 7 3 3`` -> ``7 3``), so it counts one symbol
per code segment. It prices the symbols only, not their durations (a lower bound on a lossless
run-length code such as ``wnhsu/ZeroSpeech2019_RLE_eval``'s).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from s2i.analysis.words import code_runs, strip_padding


class BitrateError(ValueError):
    """Durations missing or inconsistent with the code sequences."""


def entropy_bits(symbols: np.ndarray) -> float:
    """Entropy in bits of the empirical distribution of ``symbols``."""
    symbols = np.asarray(symbols).reshape(-1)
    if symbols.size == 0:
        return 0.0
    _, counts = np.unique(symbols, return_counts=True)
    p = counts / counts.sum()
    return float(0.0 - (p * np.log2(p)).sum())  # 0.0 - : no "-0.0" for a single symbol


@dataclass
class Bitrate:
    bitrate: float  # bits per second, one symbol per frame
    bitrate_rle: float  # bits per second, one symbol per run of identical codes
    entropy: float  # bits per symbol (frames)
    entropy_rle: float  # bits per symbol (runs)
    symbols_per_s: float
    symbols_per_s_rle: float
    duration: float  # seconds in all
    n_symbols: int
    n_symbols_rle: int

    def summary(self) -> dict:
        return dict(self.__dict__)


def bitrate(codes: Sequence, durations: Sequence[float] | None = None,
            frame_shift: float | Sequence[float] | None = None) -> Bitrate:
    """Bitrate of code sequences (one per utterance), with and without merging repeated codes.

    Give each utterance's duration in seconds (``durations``, e.g. its audio length), or a
    ``frame_shift`` so the duration is taken as ``frames * frame_shift``.
    """
    seqs = [strip_padding(np.asarray(c)) for c in codes]
    if durations is None:
        if frame_shift is None:
            raise BitrateError("bitrate needs the utterances' durations or the codes' frame shift")
        shift = np.broadcast_to(np.asarray(frame_shift, dtype=float), (len(seqs),))
        durations = np.array([len(s) for s in seqs]) * shift
    durations = np.asarray(durations, dtype=float).reshape(-1)
    if durations.size != len(seqs):
        raise BitrateError(f"{len(seqs)} code sequences but {durations.size} durations")
    if np.any(durations < 0) or not np.all(np.isfinite(durations)):
        raise BitrateError("durations must be finite and non-negative seconds")
    total = float(durations.sum())
    if total <= 0:
        raise BitrateError("the utterances have no duration; cannot compute a rate per second")
    frames = np.concatenate(seqs) if seqs else np.zeros(0, dtype=np.int64)
    runs = np.concatenate([code_runs(s)[0] for s in seqs]) if seqs else np.zeros(0, dtype=np.int64)
    h, h_rle = entropy_bits(frames), entropy_bits(runs)
    return Bitrate(bitrate=frames.size / total * h, bitrate_rle=runs.size / total * h_rle, entropy=h,
                   entropy_rle=h_rle, symbols_per_s=frames.size / total, symbols_per_s_rle=runs.size / total,
                   duration=total, n_symbols=int(frames.size), n_symbols_rle=int(runs.size))
