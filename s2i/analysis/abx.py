"""ABX phone discrimination of speech representations (ZeroSpeech 2019 / 2021, libri-light ABX).

An ABX triplet takes two phone tokens A and X of the same phone and a token B of another phone; the
representation errs when X is closer to B than to A (a tie counts half). The error rate is 0 for a
representation that separates phones perfectly and 0.5 for one that carries no phone information.

* **context**: ``"within"`` (the ZeroSpeech triphone condition) compares only tokens whose previous and
  next phones are the same (A, B and X share the context); ``"any"`` ignores the neighbours.
* **speakers**: ``"within"``: A, B and X come from one speaker; ``"across"``: A and B from one speaker,
  X from another.
* **distance**: dynamic time warping (DTW) over frame-wise angular distances
  ``arccos(cos(u, v)) / pi``, the summed cost divided by the length of the best path. Discrete codes are
  compared as one-hot vectors (0 when equal, 0.5 when not) or, given the codebook, through the angle
  between their code vectors.
* **averaging** (as libri-light's ABX): error per (context, speaker, phone A, phone B) group, averaged over
  contexts (and X speakers), then over speakers, then over phone pairs.
* **sampling**: at most ``max_size_group`` tokens per (context, speaker, phone) and ``max_x_across`` X
  speakers per A group, drawn with a fixed seed, which bounds the work on large sets; beyond
  ``max_dtw`` distances, a random subset of the groups is scored.

A phone token covers the frames whose centre lies inside it (at least the frame under its middle), with
frame ``k`` centred at ``(k + 0.5) * frame_shift``. All DTWs of a run are computed together, batched by
length over anti-diagonals with numpy.

This follows libri-light-abx2 (PyPI ``zerospeech-libriabx2``), which also runs offline on CPU; it is
re-implemented rather than wrapped because that package reads features from one file per utterance,
prints to stdout, builds a C extension at install time and uses torch APIs deprecated since torch 2.
``tests/test_analysis.py`` checks both give the same numbers when the package is installed.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from tqdm import tqdm

from s2i.analysis.words import SILENCE, Alignment

log = logging.getLogger(__name__)

SPEAKER_MODES = ("within", "across")
CONTEXT_MODES = ("within", "any")
_EDGE = "#"  # the context label of an utterance edge, a silence or a pause
_SAME = 4e-6  # cosines this close to 1 (angles under 0.16 degrees) are float32 noise: read as equal frames
PAUSE = 0.02  # seconds: a gap this long between two aligned phones is a pause


class ABXError(ValueError):
    """Features, alignments or options that ABX cannot use."""


@dataclass
class ABXResult:
    """ABX error rates (0 = perfect, 0.5 = chance); ``None`` where no triplet could be formed."""

    within: float | None  # A, B, X from one speaker
    across: float | None  # X from another speaker than A and B
    context: str  # "within" (triphone) or "any"
    n_items: int  # phone tokens used (after sampling)
    n_pairs_within: int  # (phone A, phone B) pairs averaged over
    n_pairs_across: int

    def summary(self) -> dict:
        return dict(self.__dict__)


# ---------------------------------------------------------------------------------------------
# phone tokens
# ---------------------------------------------------------------------------------------------
@dataclass
class _Items:
    utt: np.ndarray
    start: np.ndarray  # first frame
    stop: np.ndarray  # end frame (exclusive)
    phone: np.ndarray  # ids
    context: np.ndarray
    speaker: np.ndarray


def _phone_items(phones: Sequence[Alignment], speakers: Sequence[str], n_frames: np.ndarray,
                 shift: np.ndarray, context: str) -> tuple[_Items, list[str]]:
    """Every non-silence phone with its neighbours, as frame ranges of its utterance."""
    rows, phone_ids, context_ids, speaker_ids = [], {}, {}, {}
    for u, (alignment, spk) in enumerate(zip(phones, speakers)):
        labels, times = [], []
        for item in alignment or ():
            try:
                labels.append(str(item[0]).strip())
                times.append((float(item[1]), float(item[2])))
            except (TypeError, ValueError, IndexError):
                raise ABXError(f"utterance {u}: a phone alignment must be (phone, start_s, end_s), "
                               f"got {item!r}") from None
        # a neighbour counts as context only if it is a phone and follows without a pause
        heard = [label.lower() not in SILENCE for label in labels]
        for i, (label, (s, e)) in enumerate(zip(labels, times)):
            if not heard[i] or e <= s:
                continue
            prev = labels[i - 1] if i > 0 and heard[i - 1] and s - times[i - 1][1] < PAUSE else _EDGE
            nxt = labels[i + 1] if i + 1 < len(labels) and heard[i + 1] and times[i + 1][0] - e < PAUSE else _EDGE
            ctx = f"{prev}_{nxt}" if context == "within" else ""
            rows.append((u, s, e, phone_ids.setdefault(label, len(phone_ids)),
                         context_ids.setdefault(ctx, len(context_ids)),
                         speaker_ids.setdefault(str(spk), len(speaker_ids))))
    if not rows:
        raise ABXError("no phone tokens: the alignments are empty or silence only (is the corpus prepared "
                       "with phone alignments?)")
    arr = np.array(rows, dtype=float)
    utt = arr[:, 0].astype(np.int64)
    h, n = shift[utt], n_frames[utt]
    start = np.ceil(arr[:, 1] / h - 0.5 - 1e-9)
    stop = np.ceil(arr[:, 2] / h - 0.5 - 1e-9)
    mid = np.floor((arr[:, 1] + arr[:, 2]) / 2 / h)
    short = stop <= start
    start, stop = np.where(short, mid, start), np.where(short, mid + 1, stop)
    start, stop = np.clip(start, 0, n).astype(np.int64), np.clip(stop, 0, n).astype(np.int64)
    keep = stop > start  # tokens past the end of the features are dropped
    if not keep.all():
        log.warning("ABX: %d of %d phone tokens lie beyond their utterance's features and are skipped",
                    int((~keep).sum()), keep.size)
    items = _Items(utt[keep], start[keep], stop[keep], arr[keep, 3].astype(np.int64),
                   arr[keep, 4].astype(np.int64), arr[keep, 5].astype(np.int64))
    return items, list(phone_ids)


def _sample(items: _Items, max_size_group: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of at most ``max_size_group`` random tokens per (context, speaker, phone)."""
    _, group = np.unique(np.stack([items.context, items.speaker, items.phone]), axis=1, return_inverse=True)
    order = rng.permutation(group.size)
    order = order[np.argsort(group[order], kind="stable")]
    g = group[order]
    first = np.r_[0, np.flatnonzero(g[1:] != g[:-1]) + 1]
    rank = np.arange(g.size) - np.repeat(first, np.diff(np.r_[first, g.size]))
    return np.sort(order[rank < max_size_group])


# ---------------------------------------------------------------------------------------------
# distances
# ---------------------------------------------------------------------------------------------
class _Segments:
    """The frames of the sampled tokens, laid end to end, and how to compare two of them."""

    def __init__(self, features: Sequence[np.ndarray], items: _Items, codebook: np.ndarray | None):
        self.codes = features[0].ndim == 1
        self.length = items.stop - items.start
        self.offset = np.r_[0, np.cumsum(self.length)]
        utt_offset = np.r_[0, np.cumsum([len(f) for f in features])]
        first = utt_offset[items.utt] + items.start  # each token's first frame among all frames
        frames = np.repeat(first - self.offset[:-1], self.length) + np.arange(self.offset[-1])
        if self.codes:
            all_codes = np.concatenate([np.asarray(f, dtype=np.int64) for f in features])
            self.data = all_codes[frames]
            if codebook is None:
                self.table = None
            else:
                if self.data.size and self.data.max() >= len(codebook):
                    raise ABXError(f"a code ({int(self.data.max())}) is outside the codebook ({len(codebook)} codes)")
                unit = codebook / np.maximum(np.linalg.norm(codebook, axis=1, keepdims=True), 1e-12)
                cos = unit @ unit.T
                cos[cos > 1 - _SAME] = 1
                self.table = (np.arccos(np.maximum(cos, -1)) / np.pi).astype(np.float32)
        else:
            x = np.concatenate([np.asarray(f, dtype=np.float32) for f in features])[frames]
            self.data = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    def gather(self, idx: np.ndarray, width: int) -> np.ndarray:
        """(P, width[, D]) frames of tokens ``idx``, the last frame repeated as padding."""
        pos = np.minimum(np.arange(width)[None, :], self.length[idx][:, None] - 1) + self.offset[idx][:, None]
        return self.data[pos]

    def frame_distances(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """(P, La, Lb) angular distances between the frames of tokens a[p] and b[p]."""
        la, lb = int(self.length[a].max()), int(self.length[b].max())
        xa, xb = self.gather(a, la), self.gather(b, lb)
        if self.codes:
            if self.table is None:
                return np.where(xa[:, :, None] == xb[:, None, :], np.float32(0), np.float32(0.5))
            return self.table[xa[:, :, None], xb[:, None, :]]
        cos = np.matmul(xa, xb.transpose(0, 2, 1))
        cos[cos > 1 - _SAME] = 1  # rounding noise of identical frames, which arccos would blow up
        return np.arccos(np.maximum(cos, -1)) / np.float32(np.pi)

    def dtw(self, a: np.ndarray, b: np.ndarray, budget: int = 4_000_000) -> np.ndarray:
        """Path-normalised DTW distance of each pair (a[p], b[p]), in chunks of similar lengths
        holding about ``budget`` numbers each."""
        out = np.empty(a.size)
        longest = np.maximum(self.length[a], self.length[b])
        order = np.argsort(longest, kind="stable")
        longest = longest[order]
        dim = 1 if self.codes else self.data.shape[1]

        def fits(length: int) -> int:
            return max(1, budget // ((length + 1) ** 2 * 3 + 2 * length * dim))

        start = 0
        while start < order.size:
            end = min(order.size, start + fits(int(longest[start])))
            end = start + min(end - start, fits(int(longest[end - 1])))
            idx = order[start:end]
            out[idx] = _dtw(self.frame_distances(a[idx], b[idx]), self.length[a[idx]], self.length[b[idx]])
            start = end
        return out


def _dtw(d: np.ndarray, la: np.ndarray, lb: np.ndarray) -> np.ndarray:
    """DTW of (P, La, Lb) distance matrices ending at (la - 1, lb - 1), cost / path length.

    Steps are (1, 1), (1, 0), (0, 1); among equal-cost predecessors the diagonal wins, then (0, 1)
    (libri-light's choice). Cells on one anti-diagonal do not depend on each other, so the grid is
    stored skewed, ``[diagonal, row, pair]``: each anti-diagonal is one contiguous, vectorised step.
    """
    p, n_a, n_b = d.shape
    n_diag = n_a + n_b + 1  # diagonals of the grid padded with a border row and column
    rows = np.arange(n_a + 1)[None, :]
    diagonal = np.arange(n_diag)[:, None]
    k, i = np.nonzero((rows >= 1) & (diagonal - rows >= 1) & (diagonal - rows <= n_b))
    skewed = np.zeros((n_diag, n_a + 1, p), dtype=np.float32)
    skewed[k, i] = d[:, i - 1, k - i - 1].T
    cost = np.full((n_diag, n_a + 1, p), np.inf, dtype=np.float32)
    steps = np.zeros((n_diag, n_a + 1, p), dtype=np.int32)
    cost[0, 0] = 0.0
    for k in range(2, n_diag):
        lo, hi = max(1, k - n_b), min(k - 1, n_a)  # rows of diagonal k inside the grid
        diag, up, left = cost[k - 2, lo - 1:hi], cost[k - 1, lo - 1:hi], cost[k - 1, lo:hi + 1]
        best = np.minimum(np.minimum(diag, left), up)
        steps[k, lo:hi + 1] = 1 + np.where(diag == best, steps[k - 2, lo - 1:hi],
                                           np.where(left == best, steps[k - 1, lo:hi + 1], steps[k - 1, lo - 1:hi]))
        np.add(best, skewed[k, lo:hi + 1], out=cost[k, lo:hi + 1])
    pair = np.arange(p)
    return cost[la + lb, la, pair] / steps[la + lb, la, pair]


# ---------------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------------
def _errors_per_b(d_xa: np.ndarray, d_xo: np.ndarray, other_phone: np.ndarray, n_phones: int,
                  exclude_diagonal: bool) -> tuple[np.ndarray, np.ndarray]:
    """For X rows against A columns and other-phone columns: (errors, triplets) per other phone."""
    nx, na = d_xa.shape
    cmp = d_xa[:, :, None] - d_xo[:, None, :]  # > 0: X nearer to B than to A
    wrong = (cmp > 0) + 0.5 * (cmp == 0)
    if exclude_diagonal:  # X and A are the same token
        wrong[np.arange(nx), np.arange(nx), :] = 0
        pairs = nx * (na - 1)
    else:
        pairs = nx * na
    errors = np.bincount(other_phone, weights=wrong.sum(axis=(0, 1)), minlength=n_phones)
    triplets = np.bincount(other_phone, minlength=n_phones) * pairs
    return errors, triplets


def _average(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean of values per unique key row: (unique keys, means)."""
    uniq, inv = np.unique(keys, axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    return uniq, np.bincount(inv, weights=values) / np.bincount(inv)


def _zerospeech_mean(records: list[tuple[int, int, int, float]]) -> tuple[float | None, int]:
    """ZeroSpeech averaging of (speaker, phone A, phone B, error) records, one per context (and X
    speaker): mean per (speaker, A, B), then over speakers per (A, B), then over (A, B) pairs."""
    if not records:
        return None, 0
    r = np.array(records, dtype=float)
    keys, per_speaker = _average(r[:, :3].astype(np.int64), r[:, 3])
    pairs, per_pair = _average(keys[:, 1:], per_speaker)
    return float(per_pair.mean()), int(len(pairs))


def _plan(items: _Items, speaker_modes: tuple[str, ...], max_x_across: int,
          rng: np.random.Generator) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The blocks of distances to compute, as (mode, X tokens, cell tokens).

    A *cell* is the tokens of one (context, speaker): A and B come from one cell. Within speakers, X
    ranges over the cell too; across speakers, X is a group (context, other speaker, phone A), for at
    most ``max_x_across`` other speakers per (cell, phone A).
    """
    _, cell = np.unique(np.stack([items.context, items.speaker]), axis=1, return_inverse=True)
    cell = cell.reshape(-1)
    members = np.split(np.argsort(cell, kind="stable"), np.cumsum(np.bincount(cell))[:-1])
    members = [m for m in members if np.unique(items.phone[m]).size > 1]  # B needs another phone
    blocks: list[tuple[str, np.ndarray, np.ndarray]] = []
    if "within" in speaker_modes:
        blocks += [("within", m, m) for m in members]
    if "across" in speaker_modes:
        order = np.lexsort((items.phone, items.speaker, items.context))
        keys = np.stack([items.context, items.speaker, items.phone], axis=1)[order]
        bounds = np.r_[0, np.flatnonzero(np.any(keys[1:] != keys[:-1], axis=1)) + 1, order.size]
        group = {tuple(keys[s].tolist()): order[s:e] for s, e in zip(bounds[:-1], bounds[1:])}
        speakers_of: dict[tuple[int, int], list[int]] = {}
        for c, s, p in group:
            speakers_of.setdefault((c, p), []).append(s)
        for m in members:
            c, s = int(items.context[m[0]]), int(items.speaker[m[0]])
            for p in np.unique(items.phone[m]).tolist():
                others = [o for o in speakers_of[(c, p)] if o != s]
                if len(others) > max_x_across:
                    others = sorted(rng.choice(others, size=max_x_across, replace=False).tolist())
                blocks += [("across", group[(c, o, p)], m) for o in others]
    return blocks


def _cap(blocks: list, sizes: list[int], max_dtw: int, rng: np.random.Generator) -> list:
    """A random subset of each speaker mode's blocks, in proportion to what the mode needs, that fits
    ``max_dtw`` distances."""
    total = sum(sizes)
    chosen: list[int] = []
    for mode in SPEAKER_MODES:
        mine = np.array([b for b, block in enumerate(blocks) if block[0] == mode], dtype=np.int64)
        if mine.size:
            mine = mine[rng.permutation(mine.size)]
            need = np.asarray(sizes)[mine]
            fits = np.cumsum(need) <= max_dtw * need.sum() / total
            fits[0] = True
            chosen += mine[fits].tolist()
    log.warning("ABX: %d DTWs needed, more than max_dtw=%d: scoring a random %.0f%% of the groups",
                total, max_dtw, 100 * len(chosen) / len(blocks))
    return [blocks[i] for i in sorted(chosen)]


def _score_block(block: tuple[str, np.ndarray, np.ndarray], dist: np.ndarray, items: _Items,
                 n_phones: int) -> list[tuple[int, int, int, float]]:
    """(speaker, phone A, phone B, error) of one block's triplets, one record per (A, B)."""
    mode, x_tok, cell_tok = block
    d = dist.reshape(len(x_tok), len(cell_tok))
    phone = items.phone[cell_tok]
    if mode == "within":  # one DTW per unordered pair of same-phone tokens, as libri-light
        i, j = np.triu_indices(len(cell_tok), 1)
        same = phone[i] == phone[j]
        d[j[same], i[same]] = d[i[same], j[same]]
    speaker = int(items.speaker[cell_tok[0]])
    records = []
    for a in (np.unique(phone).tolist() if mode == "within" else [int(items.phone[x_tok[0]])]):
        is_a = phone == a
        if mode == "within" and is_a.sum() < 2:
            continue
        d_x = d[is_a] if mode == "within" else d  # within: X ranges over the A tokens themselves
        errors, triplets = _errors_per_b(d_x[:, is_a], d_x[:, ~is_a], phone[~is_a], n_phones,
                                         exclude_diagonal=mode == "within")
        records += [(speaker, a, int(b), errors[b] / triplets[b]) for b in np.flatnonzero(triplets)]
    return records


def abx(features: Sequence[np.ndarray], frame_shift: float | Sequence[float], phones: Sequence[Alignment],
        speakers: Sequence[str], *, context: str = "within", speaker_modes: Iterable[str] = SPEAKER_MODES,
        codebook: np.ndarray | None = None, max_size_group: int = 10, max_x_across: int = 5,
        seed: int = 0, max_dtw: int | None = 2_000_000, progress: bool = False) -> ABXResult:
    """ABX phone discrimination error of one representation over utterances.

    Args:
        features: per utterance either ``(T, D)`` float frames (continuous features) or ``(T,)`` int codes.
        frame_shift: seconds per frame (one number or one per utterance).
        phones: per utterance its phone alignment ``[(phone, start_s, end_s), ...]``.
        speakers: per utterance its speaker id.
        context: ``"within"`` (triphone: same neighbours) or ``"any"``.
        speaker_modes: which of ``"within"`` / ``"across"`` to compute.
        codebook: ``(K, D)`` code vectors; codes are then compared by angle instead of one-hot.
        max_size_group, max_x_across, seed: the sampling caps (libri-light's defaults: 10, 5).
        max_dtw: at most this many DTWs (a random subset of the groups beyond it; None = no limit). The
            triphone condition rarely reaches it; ``context="any"`` on many speakers does.
    """
    speaker_modes = tuple(speaker_modes)
    if context not in CONTEXT_MODES:
        raise ABXError(f"context must be one of {CONTEXT_MODES}, got {context!r}")
    if set(speaker_modes) - set(SPEAKER_MODES) or not speaker_modes:
        raise ABXError(f"speaker modes must be among {SPEAKER_MODES}, got {speaker_modes}")
    if not (len(features) == len(phones) == len(speakers)):
        raise ABXError(f"{len(features)} feature sequences, {len(phones)} phone alignments and "
                       f"{len(speakers)} speakers: give one of each per utterance")
    if not features:
        raise ABXError("no utterances to score")
    features = [np.asarray(f) for f in features]
    ndims = {f.ndim for f in features}
    if len(ndims) != 1 or ndims - {1, 2}:
        raise ABXError("features must all be (T, D) frames or all be (T,) codes")
    if 1 in ndims and not all(np.issubdtype(f.dtype, np.integer) for f in features):
        raise ABXError("1-D features are read as codes and must be integers")
    if max_size_group < 2:
        raise ABXError("max_size_group must be at least 2 (A and X are two tokens of one phone)")
    shift = np.broadcast_to(np.asarray(frame_shift, dtype=float), (len(features),))
    if not np.all(shift > 0):
        raise ABXError(f"frame_shift must be positive seconds, got {frame_shift!r}")
    n_frames = np.array([len(f) for f in features])
    items, phone_names = _phone_items(phones, speakers, n_frames, shift, context)
    rng = np.random.default_rng(seed)
    keep = _sample(items, max_size_group, rng)
    items = _Items(*(getattr(items, f)[keep] for f in ("utt", "start", "stop", "phone", "context", "speaker")))
    segments = _Segments(features, items, codebook)

    blocks = _plan(items, speaker_modes, max_x_across, rng)
    sizes = [len(x) * len(m) for _, x, m in blocks]
    if max_dtw and sum(sizes) > max_dtw:
        blocks = _cap(blocks, sizes, max_dtw, rng)
        sizes = [len(x) * len(m) for _, x, m in blocks]
    # every DTW needed, computed in one batch, then cut back into blocks
    rows = np.concatenate([np.repeat(x, len(m)) for _, x, m in blocks]) if blocks else np.zeros(0, dtype=np.int64)
    cols = np.concatenate([np.tile(m, len(x)) for _, x, m in blocks]) if blocks else np.zeros(0, dtype=np.int64)
    log.info("ABX: %d tokens, %d DTWs", len(keep), rows.size)
    dist = np.split(segments.dtw(rows, cols), np.cumsum(sizes)[:-1]) if blocks else []

    records: dict[str, list[tuple[int, int, int, float]]] = {"within": [], "across": []}
    for block, d in tqdm(zip(blocks, dist), total=len(blocks), disable=not progress, desc=f"ABX ({context} context)"):
        records[block[0]] += _score_block(block, d, items, len(phone_names))
    result = {mode: _zerospeech_mean(records[mode]) for mode in SPEAKER_MODES}
    if all(v[0] is None for v in result.values()):
        log.warning("ABX: no triplets could be formed (need two phones in one %s with repeated tokens)",
                    "context and speaker" if context == "within" else "speaker")
    return ABXResult(within=result["within"][0], across=result["across"][0], context=context,
                     n_items=int(len(keep)), n_pairs_within=result["within"][1], n_pairs_across=result["across"][1])
