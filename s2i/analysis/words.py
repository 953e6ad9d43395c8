"""Word detection by discrete speech units, as ResDAVEnet-VQ measures it (Harwath, Hsu & Glass, ICLR 2020).

A VQ layer turns an utterance into one code per frame. Runs of the same code are *code segments*.
For every pair (code ``c``, word ``w``), over a set of utterances with word alignments:

* precision ``P(c, w)``: the fraction of ``c``'s segments whose window of ±40 ms around the segment's
  centre overlaps an occurrence of ``w`` (a window may overlap two words; both count);
* recall ``R(c, w)``: the fraction of ``w``'s occurrences in which ``c`` occurs, i.e. a frame coded
  ``c`` has its centre inside the word (words shorter than a frame take the frame under their middle);
* ``F1 = 2PR / (P + R)``.

Stop words (ResDAVEnet-VQ's short list, :data:`STOP_WORDS`; also tokens made of stop words only, such
as eSpeak's merged "of a") and silence markers are left out, so they
are never a code's word, nor counted among the words. A word is *detected* when its best code reaches
F1 ≥ 0.5; the paper reports how many words are detected and the mean F1 of the 250 best-detected
words. (ResDAVEnet-VQ keeps stop words in the word count with F1 = 0 and places the window around the
middle frame of a run rather than the run's middle; both differ from this only at the margins.)

Everything is vectorised over frames, segments and word occurrences (sorted search + sparse counts);
nothing loops over (code, word) pairs in Python. Frame ``k`` of a layer with frame shift ``h`` spans
``[k h, (k + 1) h)`` seconds.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Iterable, NamedTuple, Sequence

import numpy as np

log = logging.getLogger(__name__)

#: A word alignment: ``(word, start_s, end_s)``.
Alignment = Sequence[tuple[str, float, float]]

#: Function words left out of word detection: ResDAVEnet-VQ's list (``steps/unit_analysis.py``).
STOP_WORDS: frozenset[str] = frozenset({"a", "an", "the", "and", "of", "to", "on", "in", "at", "are", "is", "it",
                                        "he", "she", "you", "there", "this"})

#: Alignment labels that mark silence or noise rather than a word (or a phone).
SILENCE: frozenset[str] = frozenset({"", "sil", "sp", "spn", "<sil>", "<s>", "</s>", "<unk>", "<noise>",
                                     "<spoken_noise>", "_", "pau", "h#", "#", "silence"})

_STRIP = re.compile(r"^[^\w']+|[^\w']+$")


class WordDetectionError(ValueError):
    """The codes and alignments given to word detection do not fit together."""


def normalize_word(word: str) -> str:
    """Lower-case and strip surrounding punctuation: ``"Dog,"`` -> ``"dog"``."""
    return _STRIP.sub("", word.strip().lower())


# ---------------------------------------------------------------------------------------------
# code segments
# ---------------------------------------------------------------------------------------------
def code_runs(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs of identical values: (value, first frame, end frame (exclusive)) per run."""
    codes = np.asarray(codes).reshape(-1)
    if codes.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
    ends = np.r_[starts[1:], codes.size]
    return codes[starts].astype(np.int64), starts, ends


def code_segments(codes: Sequence[int] | np.ndarray, frame_shift: float) -> list[tuple[int, float, float]]:
    """Merge runs of identical codes into ``[(code, start_s, end_s), ...]`` (frame k = [k h, (k+1) h))."""
    _check_shift(frame_shift)
    values, starts, ends = code_runs(strip_padding(np.asarray(codes)))
    return [(int(c), float(s * frame_shift), float(e * frame_shift)) for c, s, e in zip(values, starts, ends)]


def _check_shift(frame_shift: float) -> None:
    if not np.all(np.asarray(frame_shift, dtype=float) > 0):
        raise WordDetectionError(f"frame_shift must be a positive number of seconds, got {frame_shift!r}")


def strip_padding(codes: np.ndarray) -> np.ndarray:
    """Drop the padding marker (-1) that batched encoders leave after an utterance's end."""
    codes = np.asarray(codes).reshape(-1)
    if codes.size and codes.min() < 0:
        first = int(np.argmax(codes < 0))
        if codes[first:].max() >= 0:
            raise WordDetectionError("a code sequence has negative codes before its end; only trailing "
                                     "padding (-1) is allowed")
        codes = codes[:first]
    if codes.size and not np.issubdtype(codes.dtype, np.integer):
        if not np.all(codes == np.round(codes)):
            raise WordDetectionError(f"codes must be integers, got {codes.dtype} values")
    return codes.astype(np.int64, copy=False)


@dataclass
class _Frames:
    """All utterances' codes laid end to end."""

    codes: np.ndarray  # (N,) code per frame
    offset: np.ndarray  # (U + 1,) first frame of each utterance
    shift: np.ndarray  # (U,) frame shift per utterance, seconds

    @classmethod
    def build(cls, codes_seqs: Sequence, frame_shift: float | Sequence[float]) -> "_Frames":
        seqs = [strip_padding(np.asarray(c)) for c in codes_seqs]
        shift = np.broadcast_to(np.asarray(frame_shift, dtype=float), (len(seqs),)).copy()
        _check_shift(shift)
        offset = np.zeros(len(seqs) + 1, dtype=np.int64)
        offset[1:] = np.cumsum([len(s) for s in seqs])
        codes = np.concatenate(seqs) if seqs else np.zeros(0, dtype=np.int64)
        return cls(codes, offset, shift)

    def segments(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(code, utterance, start_s, end_s) of every code segment, utterance boundaries respected."""
        n = self.codes.size
        new = np.ones(n, dtype=bool)
        new[1:] = self.codes[1:] != self.codes[:-1]
        new[self.offset[:-1][self.offset[:-1] < n]] = True
        first = np.flatnonzero(new)
        end = np.r_[first[1:], n]
        utt = np.searchsorted(self.offset, first, side="right") - 1
        local = first - self.offset[utt]
        h = self.shift[utt]
        return self.codes[first], utt, local * h, (local + end - first) * h


@dataclass
class _Words:
    """Content-word occurrences of all utterances, sorted by (utterance, start)."""

    word: np.ndarray  # (M,) index into vocab
    utt: np.ndarray  # (M,)
    start: np.ndarray  # (M,) seconds
    end: np.ndarray  # (M,)
    vocab: list[str]

    @classmethod
    def build(cls, alignments: Sequence[Alignment], stop_words: Iterable[str]) -> "_Words":
        stop = {normalize_word(w) for w in stop_words} | SILENCE
        index: dict[str, int] = {}
        rows: list[tuple[int, int, float, float]] = []
        for u, words in enumerate(alignments):
            for item in words or ():
                try:
                    text, start, end = item[0], float(item[1]), float(item[2])
                except (TypeError, ValueError, IndexError):
                    raise WordDetectionError(f"utterance {u}: a word alignment must be (word, start_s, end_s), "
                                             f"got {item!r}") from None
                w = normalize_word(str(text))
                # aligners may merge function words into one token ("of a", "on the"): still stop words
                if w in stop or end <= start or all(part in stop for part in w.split()):
                    continue
                rows.append((index.setdefault(w, len(index)), u, start, end))
        arr = np.array(rows, dtype=float).reshape(-1, 4)
        order = np.lexsort((arr[:, 2], arr[:, 1]))
        arr = arr[order]
        return cls(arr[:, 0].astype(np.int64), arr[:, 1].astype(np.int64), arr[:, 2], arr[:, 3], list(index))


def _expand(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All (query q, position p) with lo[q] <= p < hi[q], without a Python loop."""
    counts = np.maximum(hi - lo, 0)
    query = np.repeat(np.arange(lo.size), counts)
    within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return query, lo[query] + within


_EPS = 1e-6  # seconds: touching is not overlapping


def _overlapping_words(words: _Words, utt: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (query, word occurrence) where occurrence overlaps the interval (lo, hi) of the query's utterance."""
    if words.word.size == 0 or utt.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    # Put utterances on one time line, far apart, so one sorted search serves all of them.
    span = float(max(words.end.max(), hi.max())) + 1.0
    w_start = words.utt * span + words.start
    w_end_max = np.maximum.accumulate(words.utt * span + words.end)  # sorted even if words overlap
    q_lo, q_hi = utt * span + lo, utt * span + hi
    first = np.searchsorted(w_end_max, q_lo + _EPS, side="right")
    last = np.searchsorted(w_start, q_hi - _EPS, side="left")
    q, w = _expand(first, last)
    keep = (words.utt[w] == utt[q]) & (words.end[w] > lo[q] + _EPS) & (words.start[w] < hi[q] - _EPS)
    return q[keep], w[keep]


# ---------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------
@dataclass
class CodeWordTable:
    """Precision, recall and F1 of (code, word) pairs, one row per pair, best F1 first.

    Only pairs with both precision and recall above zero are listed (the others have F1 = 0).
    """

    code: np.ndarray  # (n,) int
    word: np.ndarray  # (n,) str (object)
    precision: np.ndarray  # (n,)
    recall: np.ndarray  # (n,)
    f1: np.ndarray  # (n,)
    count: np.ndarray  # (n,) occurrences of the word in which the code occurs (recall's numerator; "occ")
    code_hits: np.ndarray  # (n,) segments of the code whose window overlaps the word (precision's numerator)
    code_segments: np.ndarray  # (n,) segments of the code (precision's denominator)
    word_count: np.ndarray  # (n,) occurrences of the word (recall's denominator)

    COLUMNS = ("code", "word", "precision", "recall", "f1", "count", "code_hits", "code_segments", "word_count")

    def __len__(self) -> int:
        return int(self.code.size)

    def take(self, index: np.ndarray | slice) -> "CodeWordTable":
        return CodeWordTable(*(getattr(self, c)[index] for c in self.COLUMNS))

    def rows(self, limit: int | None = None) -> list[dict]:
        """The first ``limit`` rows as JSON-ready dicts."""
        n = len(self) if limit is None else min(limit, len(self))
        cols = {c: getattr(self, c)[:n].tolist() for c in self.COLUMNS}
        return [{c: cols[c][i] for c in self.COLUMNS} for i in range(n)]

    def for_word(self, word: str) -> "CodeWordTable":
        return self.take(self.word == normalize_word(word))

    def for_code(self, code: int) -> "CodeWordTable":
        return self.take(self.code == int(code))

    def best_per_word(self) -> "CodeWordTable":
        """Each word's best code (highest F1; ties to the lower code), best words first."""
        if not len(self):
            return self
        order = np.lexsort((self.code, -self.f1, self.word.astype(str)))
        _, first = np.unique(self.word[order].astype(str), return_index=True)
        best = order[first]
        return self.take(best[np.lexsort((best, -self.f1[best]))])

    def to_tsv(self, path) -> None:
        """Write the whole table as tab-separated text (one header line)."""
        with open(path, "w", encoding="utf-8") as f:
            f.write("\t".join(self.COLUMNS) + "\n")
            for r in self.rows():
                f.write("\t".join(f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in self.COLUMNS) + "\n")


def code_word_table(codes: Sequence, words: Sequence[Alignment], frame_shift: float | Sequence[float], *,
                    window: float = 0.04, stop_words: Iterable[str] = STOP_WORDS, min_count: int = 1) -> CodeWordTable:
    """The (code, word) precision / recall / F1 table over utterances.

    Args:
        codes: one code sequence per utterance (``(T,)`` ints; a trailing ``-1`` padding is dropped).
        words: one word alignment per utterance, ``[(word, start_s, end_s), ...]``.
        frame_shift: seconds per frame of this layer (one number, or one per utterance).
        window: half-width of the window around each code segment's centre (ResDAVEnet-VQ: 40 ms).
        stop_words: words never counted (default :data:`STOP_WORDS`; pass ``()`` to keep all).
        min_count: keep only pairs whose code occurs in at least this many of the word's occurrences
            (ResDAVEnet-VQ's ``min_occ``).
    """
    if len(codes) != len(words):
        raise WordDetectionError(f"{len(codes)} code sequences but {len(words)} word alignments; "
                                 "give one alignment per utterance")
    frames = _Frames.build(codes, frame_shift)
    occ = _Words.build(words, stop_words)
    table, _ = _table(frames, occ, window, min_count)
    return table


def _table(frames: _Frames, occ: _Words, window: float, min_count: int) -> tuple[CodeWordTable, np.ndarray]:
    """The table, and the number of occurrences of every vocabulary word."""
    n_vocab = len(occ.vocab)
    if n_vocab == 0 or frames.codes.size == 0:
        empty = np.zeros(0)
        return CodeWordTable(empty.astype(np.int64), empty.astype(object), empty, empty, empty,
                             *(empty.astype(np.int64),) * 4), np.bincount(occ.word, minlength=n_vocab)
    word_count = np.bincount(occ.word, minlength=n_vocab)
    seg_code, seg_utt, seg_start, seg_end = frames.segments()
    n_codes = int(frames.codes.max()) + 1 if frames.codes.size else 0
    segs_per_code = np.bincount(seg_code, minlength=n_codes)

    # precision: code segment's centre window vs. word occurrences (each word type once per segment)
    centre = (seg_start + seg_end) / 2
    s, w = _overlapping_words(occ, seg_utt, centre - window, centre + window)
    seg_word = np.unique(s * n_vocab + occ.word[w])
    p_key, p_count = np.unique(seg_code[seg_word // n_vocab] * n_vocab + seg_word % n_vocab, return_counts=True)

    # recall: word occurrence vs. frames whose centre lies inside it
    h = frames.shift[occ.utt]
    n_frames = np.diff(frames.offset)[occ.utt]
    lo = np.clip(np.ceil(occ.start / h - 0.5 - 1e-9), 0, n_frames).astype(np.int64)
    hi = np.clip(np.ceil(occ.end / h - 0.5 - 1e-9), 0, n_frames).astype(np.int64)
    short = (hi <= lo) & (n_frames > 0)  # shorter than a frame: the frame under its middle
    mid = np.clip(np.floor((occ.start + occ.end) / 2 / h), 0, np.maximum(n_frames - 1, 0)).astype(np.int64)
    lo = np.where(short, mid, lo)
    hi = np.where(short, mid + 1, hi)
    o, f = _expand(lo, hi)
    o_code = np.unique(o * max(n_codes, 1) + frames.codes[frames.offset[occ.utt[o]] + f])
    r_key, r_count = np.unique((o_code % max(n_codes, 1)) * n_vocab + occ.word[o_code // max(n_codes, 1)],
                               return_counts=True)

    key, ip, ir = np.intersect1d(p_key, r_key, assume_unique=True, return_indices=True)
    if min_count > 1:  # pairs whose code occurs in too few of the word's occurrences are noise
        ip, ir, key = ip[r_count[ir] >= min_count], ir[r_count[ir] >= min_count], key[r_count[ir] >= min_count]
    code, word = key // max(n_vocab, 1), key % max(n_vocab, 1)
    precision = p_count[ip] / segs_per_code[code]
    recall = r_count[ir] / word_count[word]
    f1 = 2 * precision * recall / (precision + recall)
    order = np.lexsort((word, code, -f1))
    vocab = np.array(occ.vocab, dtype=object)
    table = CodeWordTable(code[order], vocab[word[order]] if key.size else np.zeros(0, dtype=object),
                          precision[order], recall[order], f1[order], r_count[ir][order], p_count[ip][order],
                          segs_per_code[code][order], word_count[word][order])
    return table, word_count


# ---------------------------------------------------------------------------------------------
# the summary the paper reports
# ---------------------------------------------------------------------------------------------
@dataclass
class WordDetection:
    """Word detection by one layer's codes."""

    n_words: int  # content-word types in the alignments
    n_detected: int  # of those, words whose best code has F1 >= threshold
    fraction_detected: float
    threshold: float
    top_n: int  # the N of "mean F1 of the top-N words" (capped at n_words)
    mean_f1_top: float
    mean_f1_all: float  # mean best F1 over every content word (0 for words no code ever hits)
    n_codes_used: int
    table: CodeWordTable  # every (code, word) pair with F1 > 0
    best: CodeWordTable  # each word's best code, best first

    def summary(self) -> dict:
        """The scalar figures, JSON-ready."""
        return {"n_words": self.n_words, "n_detected": self.n_detected, "fraction_detected": self.fraction_detected,
                "threshold": self.threshold, "top_n": self.top_n, "mean_f1_top": self.mean_f1_top,
                "mean_f1_all": self.mean_f1_all, "n_codes_used": self.n_codes_used}


def word_detection(codes: Sequence, words: Sequence[Alignment], frame_shift: float | Sequence[float], *,
                   top_n: int = 250, threshold: float = 0.5, window: float = 0.04,
                   stop_words: Iterable[str] = STOP_WORDS, min_count: int = 1) -> WordDetection:
    """How well one layer's codes detect words (ResDAVEnet-VQ's ``unit_analysis``); see the module doc."""
    if len(codes) != len(words):
        raise WordDetectionError(f"{len(codes)} code sequences but {len(words)} word alignments; "
                                 "give one alignment per utterance")
    frames = _Frames.build(codes, frame_shift)
    occ = _Words.build(words, stop_words)
    if not occ.vocab:
        raise WordDetectionError("no content words in the alignments (all were stop words or silence, or "
                                 "the corpus has no word alignments)")
    table, word_count = _table(frames, occ, window, min_count)
    best = table.best_per_word()
    best_f1 = np.sort(np.r_[best.f1, np.zeros(int((word_count > 0).sum()) - len(best))])[::-1]
    n_words = best_f1.size
    n = min(int(top_n), n_words)
    detected = int((best_f1 >= threshold).sum())
    return WordDetection(n_words=n_words, n_detected=detected, fraction_detected=detected / n_words,
                         threshold=float(threshold), top_n=n, mean_f1_top=float(best_f1[:n].mean()) if n else 0.0,
                         mean_f1_all=float(best_f1.mean()), n_codes_used=int(np.unique(frames.codes).size),
                         table=table, best=best)


def detected_in_any(detections: Sequence[WordDetection]) -> dict:
    """Words detected by *some* layer: a word counts when its best code in any of ``detections``
    (one per layer, same alignments and threshold) has F1 >= the threshold."""
    if not detections:
        raise WordDetectionError("no layers to combine")
    found = {str(w) for wd in detections for w, f in zip(wd.best.word, wd.best.f1) if f >= wd.threshold}
    n_words = detections[0].n_words
    return {"n_words": n_words, "n_detected": len(found), "fraction_detected": len(found) / n_words,
            "threshold": detections[0].threshold}


# ---------------------------------------------------------------------------------------------
# browsing one code (the app's VQ tab)
# ---------------------------------------------------------------------------------------------
class CodeOccurrence(NamedTuple):
    utt: int | str  # the utterance's index, or its id when ids are given
    start: float  # seconds
    end: float
    words: tuple[str, ...]  # words overlapping the ±window around the segment's centre (all words, stop words too)


def segments_for_code(code: int, codes: Sequence, frame_shift: float | Sequence[float], *,
                      words: Sequence[Alignment] | None = None, utt_ids: Sequence[str] | None = None,
                      window: float = 0.04, limit: int | None = None) -> list[CodeOccurrence]:
    """Every segment of ``code`` across utterances (in corpus order), with the words under it."""
    frames = _Frames.build(codes, frame_shift)
    seg_code, seg_utt, seg_start, seg_end = frames.segments()
    hit = np.flatnonzero(seg_code == int(code))
    if limit is not None:
        hit = hit[:limit]
    labels: list[tuple[str, ...]] = [()] * hit.size
    if words is not None and hit.size:
        occ = _Words.build(words, stop_words=())
        centre = (seg_start[hit] + seg_end[hit]) / 2
        q, w = _overlapping_words(occ, seg_utt[hit], centre - window, centre + window)
        found: list[list[str]] = [[] for _ in range(hit.size)]
        for qi, wi in zip(q.tolist(), w.tolist()):  # only this code's few segments
            found[qi].append(occ.vocab[occ.word[wi]])
        labels = [tuple(x) for x in found]
    names = list(utt_ids) if utt_ids is not None else None
    return [CodeOccurrence(names[u] if names else int(u), float(s), float(e), lab)
            for u, s, e, lab in zip(seg_utt[hit].tolist(), seg_start[hit], seg_end[hit], labels)]
