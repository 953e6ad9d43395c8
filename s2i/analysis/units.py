"""``python -m s2i analyze units``: what a checkpoint's VQ layers learned, measured on a corpus split.

For every VQ layer: word detection (:mod:`s2i.analysis.words`), bitrate (:mod:`s2i.analysis.bitrate`)
and ABX phone discrimination of its codes (:mod:`s2i.analysis.abx`), next to ABX of MFCCs (the
baseline) and of every layer's continuous activations (``layer0`` = the front end, ``layer<p>`` =
the output of block p, before its VQ if it has one): which layer discriminates phones best is a
finding, not a given. The report is a folder:

    report.json        every figure, plus each layer's best (code, word) pairs
    report.md          the same as tables, with the plots
    words_<layer>.tsv  the full (code, word, precision, recall, F1, count) table of a layer
    f1_<layer>.png     precision vs recall of each word's best code
    summary.png        ABX error per representation and bitrate per layer

Word detection needs word alignments in the corpus (``words``), ABX phone alignments (``phones``);
what a corpus lacks is skipped with a note. ``--by`` (grouped as ``evaluate --by``, e.g.
``'speaker~^([^+]+)'``: per accent) adds word detection within each group of utterances and counts
the words whose best code is the same in every group: a word coded differently in each accent is found
within each accent but not across them. A smaller group picks each word's best code from fewer
occurrences, which favours a higher F1: compare groups of like size with each other.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from s2i.analysis.abx import ABXError, abx
from s2i.analysis.bitrate import bitrate
from s2i.analysis.words import CodeWordTable, WordDetectionError, detected_in_any, word_detection

log = logging.getLogger(__name__)

MFCC_SHIFT = 0.01  # seconds per MFCC frame
SAMPLE_RATE = 16000


class AnalysisError(ValueError):
    """The checkpoint, corpus or options cannot give the asked-for analysis."""


@dataclass
class Collected:
    """What the model makes of the analysed utterances (numpy, one entry per utterance)."""

    utt_ids: list[str]
    speakers: list[str]
    words: list[list]  # word alignments ([] where the corpus has none)
    phones: list[list]
    durations: np.ndarray  # seconds
    codes: dict[str, list[np.ndarray]]  # layer -> codes per utterance
    frame_shift: dict[str, float]  # VQ layer, "layer<p>" and "mfcc" -> seconds per frame
    codebooks: dict[str, np.ndarray]  # layer -> (K, D)
    abx_index: np.ndarray  # which utterances also have continuous features for ABX
    hidden: dict[str, list[np.ndarray]] = field(default_factory=dict)  # "layer<p>" -> frames of the ABX utterances
    mfcc: list[np.ndarray] = field(default_factory=list)  # MFCCs of the ABX utterances


def _choose(n: int, limit: int, rng: np.random.Generator) -> np.ndarray:
    """``limit`` random indices out of ``n`` in their original order (all of them when limit is 0 or more than n)."""
    if limit <= 0 or limit >= n:
        return np.arange(n)
    return np.sort(rng.choice(n, size=limit, replace=False))


def _num_samples(record: dict, audio_path) -> int:
    """An utterance's length in samples at 16 kHz, from its record or its file's header."""
    if isinstance(record.get("num_samples"), int):
        return record["num_samples"]
    import soundfile

    try:
        info = soundfile.info(str(audio_path(record)))
    except (RuntimeError, OSError):
        return 0  # reading the file later will say what is wrong with it
    return int(info.frames * SAMPLE_RATE / info.samplerate)


def collect(model, records: Sequence[dict], audio_path, *, layers: Sequence[str], abx_index: np.ndarray,
            batch_size: int = 16, progress: bool = False) -> Collected:
    """Run ``model`` over the utterance ``records`` once: codes of ``layers`` for all, every layer's
    activations and MFCCs for those in ``abx_index``. ``audio_path(record)`` gives each record's audio file."""
    import torch

    from s2i.audio import feature_extractor, load_audio

    speech = model.speech
    mfcc = feature_extractor("mfcc").to(model.device)
    for_abx = np.zeros(len(records), dtype=bool)
    for_abx[abx_index] = True
    out = Collected(utt_ids=[str(r["utt_id"]) for r in records], speakers=[str(r["speaker"]) for r in records],
                    words=[r.get("words") or [] for r in records], phones=[r.get("phones") or [] for r in records],
                    durations=np.zeros(len(records)), codes={name: [None] * len(records) for name in layers},
                    frame_shift={"mfcc": MFCC_SHIFT, **{name: model.frame_shift(int(name[2:])) for name in layers},
                                 **{f"layer{p}": model.frame_shift(p) for p in range(len(speech.strides))}},
                    abx_index=np.asarray(abx_index),
                    codebooks={name: speech.vq[name].codebook.detach().float().cpu().numpy() for name in layers})
    hidden: dict[str, dict[int, np.ndarray]] = {}
    mfccs: dict[int, np.ndarray] = {}
    # similar lengths batch together; audio is read batch by batch, never all at once
    order = np.argsort([_num_samples(r, audio_path) for r in records], kind="stable")
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    with torch.no_grad():
        for batch in tqdm(batches, desc="encoding", disable=not progress):
            waves = {i: load_audio(audio_path(records[i]), max_seconds=None) for i in batch}
            for i, w in waves.items():
                out.durations[i] = w.shape[0] / SAMPLE_RATE
            feats, lengths = model.speech_features([waves[i] for i in batch])
            result = model.encode_speech_features(feats, lengths, hidden=bool(for_abx[batch].any()))
            for b, i in enumerate(batch):
                for name in layers:
                    n = int(result.code_lengths[name][b])
                    out.codes[name][i] = result.codes[name][b, :n].cpu().numpy()
                if for_abx[i]:
                    for name, (h, h_lengths) in result.hidden.items():
                        hidden.setdefault(name, {})[i] = h[b, : int(h_lengths[b])].float().cpu().numpy()
            abx_batch = [i for i in batch if for_abx[i]]
            if abx_batch:
                wave_lengths = torch.tensor([waves[i].shape[0] for i in abx_batch])
                padded = torch.zeros(len(abx_batch), int(wave_lengths.max()))
                for b, i in enumerate(abx_batch):
                    padded[b, : waves[i].shape[0]] = waves[i]
                m, m_len = mfcc(padded.to(model.device), wave_lengths.to(model.device))
                for b, i in enumerate(abx_batch):
                    mfccs[i] = m[b, : int(m_len[b])].float().cpu().numpy()
    out.hidden = {name: [frames[i] for i in out.abx_index] for name, frames in hidden.items()}
    out.mfcc = [mfccs[i] for i in out.abx_index]
    return out


def words_within(codes: dict[str, Sequence[np.ndarray]], words: Sequence, frame_shift: dict[str, float],
                 index: np.ndarray, top_n: int = 250) -> dict[str, Any]:
    """Word detection over the utterances ``index`` only (``codes``: layer -> codes per utterance,
    ``words``: alignments per utterance): words detected per layer and in some layer, and each word's
    best code and its F1 there (``best``: word -> [code, F1])."""
    found = {name: word_detection([per_utt[i] for i in index], [words[i] for i in index], frame_shift[name],
                                  top_n=top_n) for name, per_utt in codes.items()}
    layers = {name: {"n_words": wd.n_words, "n_detected": wd.n_detected, "fraction_detected": wd.fraction_detected,
                     "best": {str(w): [int(c), round(float(f), 4)]
                              for c, w, f in zip(wd.best.code, wd.best.word, wd.best.f1)}}
              for name, wd in found.items()}
    return {"n_utterances": int(len(index)), "layers": layers, "any_layer": detected_in_any(list(found.values()))}


def words_by_group(codes: dict[str, Sequence[np.ndarray]], words: Sequence, frame_shift: dict[str, float],
                   keys: Sequence[str], top_n: int = 250) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """:func:`words_within` for each group of utterances (``keys``: one group name per utterance, e.g.
    from :func:`s2i.evaluate.group_key`) -> (``{group: ...}``, notes). A group whose utterances hold no
    content words is left out, with a note."""
    keys = np.asarray(keys, dtype=object)
    by, notes = {}, []
    for group in sorted(set(keys)):
        try:
            by[group] = words_within(codes, words, frame_shift, np.flatnonzero(keys == group), top_n=top_n)
        except WordDetectionError as exc:
            notes.append(f"word detection within group {group!r}: {exc}")
    return by, notes


def shared_codes(by: dict[str, dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per layer, of the words every group has: how many have the same best code in every group
    (a unit shared across voices or accents rather than one per group)."""
    out = {}
    for name in next(iter(by.values()))["layers"]:
        bests = [row["layers"][name]["best"] for row in by.values()]
        common = set.intersection(*(set(b) for b in bests))
        same = sum(len({b[w][0] for b in bests}) == 1 for w in common)
        out[name] = {"n_words": len(common), "n_same_code": same}
    return out


def best_across(abx_rows: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The model representation with the lowest across-speaker ABX error, and its ratio to MFCC's."""
    baseline = (abx_rows.get("mfcc") or {}).get("across")
    across = {name: r["across"] for name, r in abx_rows.items() if name != "mfcc" and r.get("across") is not None}
    if not across or not baseline:
        return None
    name = min(across, key=across.get)
    return {"representation": name, "across": across[name], "mfcc_across": baseline, "ratio": across[name] / baseline}


def _finite(value: Any) -> Any:
    """NaN and inf become None, so the report is valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def analyze(data: Collected, *, top_n: int = 250, abx_context: str = "within", abx_max_group: int = 10,
            abx_max_x: int = 5, abx_max_dtw: int = 2_000_000, seed: int = 0,
            group_keys: Sequence[str] | None = None,
            progress: bool = False) -> tuple[dict[str, Any], dict[str, CodeWordTable]]:
    """Word detection, bitrate and ABX of collected units -> (report dict, full code-word table per layer).

    ``group_keys`` (one group name per utterance, e.g. its accent) adds word detection within each group
    under ``report["by"]``: which voices' words the units find.
    """
    report: dict[str, Any] = {"n_utterances": len(data.utt_ids), "duration_s": float(data.durations.sum()),
                              "n_abx_utterances": int(len(data.abx_index)), "layers": {}, "abx": {},
                              "abx_context": abx_context, "notes": []}
    tables: dict[str, CodeWordTable] = {}
    detections = []
    has_words = any(data.words)
    has_phones = any(data.phones[i] for i in data.abx_index)
    if not has_words:
        report["notes"].append("the corpus has no word alignments: word detection skipped")
    if abx_context != "off" and not has_phones:
        report["notes"].append("the corpus has no phone alignments: ABX skipped")
    for name, codes in data.codes.items():
        layer: dict[str, Any] = {"frame_shift_s": data.frame_shift[name],
                                 "codebook_size": int(len(data.codebooks[name])),
                                 "codes_used": int(np.unique(np.concatenate(codes)).size)}
        layer["bitrate"] = bitrate(codes, data.durations).summary()
        if has_words:
            wd = word_detection(codes, data.words, data.frame_shift[name], top_n=top_n)
            layer["word_detection"] = wd.summary()
            layer["best_words"] = wd.best.rows(limit=50)
            tables[name] = wd.table
            detections.append(wd)
        report["layers"][name] = layer
    if detections:
        report["any_layer"] = detected_in_any(detections)
        if group_keys is not None:
            by, notes = words_by_group(data.codes, data.words, data.frame_shift, group_keys, top_n=top_n)
            report["notes"] += notes
            if by:
                report["by"], report["shared_codes"] = by, shared_codes(by)

    if abx_context != "off" and has_phones:
        phones = [data.phones[i] for i in data.abx_index]
        speakers = [data.speakers[i] for i in data.abx_index]
        reps: list[tuple[str, list[np.ndarray], float, np.ndarray | None]] = [("mfcc", data.mfcc, MFCC_SHIFT, None)]
        for name, codes in data.codes.items():
            sub = [codes[i] for i in data.abx_index]
            reps.append((f"{name} codes", sub, data.frame_shift[name], None))
            reps.append((f"{name} vectors", sub, data.frame_shift[name], data.codebooks[name]))
        for name, frames in data.hidden.items():
            reps.append((name, frames, data.frame_shift[name], None))
        for label, feats, shift, codebook in tqdm(reps, desc="ABX", disable=not progress):
            try:
                res = abx(feats, shift, phones, speakers, context=abx_context, codebook=codebook,
                          max_size_group=abx_max_group, max_x_across=abx_max_x, max_dtw=abx_max_dtw or None,
                          seed=seed)
                report["abx"][label] = res.summary()
            except ABXError as exc:
                report["notes"].append(f"ABX of {label}: {exc}")
        best = best_across(report["abx"])
        if best:
            report["abx_best"] = best
    return _finite(report), tables


# ---------------------------------------------------------------------------------------------
# writing the report
# ---------------------------------------------------------------------------------------------
def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def plot_f1(table: CodeWordTable, layer: str, path: Path, label_top: int = 12) -> None:
    """Precision vs recall of each word's best code, coloured by F1, the F1 = 0.5 curve dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = table.best_per_word()
    fig, ax = plt.subplots(figsize=(6, 5))
    pts = ax.scatter(best.precision, best.recall, c=best.f1, cmap="viridis", vmin=0, vmax=1, s=14)
    p = np.linspace(0.26, 1, 200)
    ax.plot(p, p / (4 * p - 1), "k--", lw=0.8, label="F1 = 0.5")  # 2pr/(p+r) = 0.5
    for i in range(min(label_top, len(best))):
        ax.annotate(f"{best.word[i]} ({best.code[i]})", (best.precision[i], best.recall[i]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.set(xlim=(0, 1.02), ylim=(0, 1.02), xlabel="precision (code → word)", ylabel="recall (word → code)",
           title=f"{layer}: best code per word")
    ax.legend(loc="lower left")
    fig.colorbar(pts, ax=ax, label="F1")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_summary(report: dict[str, Any], path: Path) -> None:
    """Bars: ABX error per representation (within / across speakers) and bitrate per layer (frames / runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    abx_rows = report.get("abx", {})
    names = list(abx_rows)
    x = np.arange(len(names))
    for k, (mode, colour) in enumerate((("within", "tab:blue"), ("across", "tab:orange"))):
        vals = [100 * (abx_rows[n].get(mode) or np.nan) for n in names]
        axes[0].bar(x + (k - 0.5) * 0.38, vals, 0.38, label=f"{mode} speakers", color=colour)
    axes[0].set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    axes[0].set(ylabel="ABX error (%)", title=f"ABX ({report.get('abx_context')} context); chance = 50%")
    axes[0].axhline(50, color="grey", lw=0.6, ls=":")
    if names:
        axes[0].legend(fontsize=8)
    layers = list(report.get("layers", {}))
    x = np.arange(len(layers))
    rates = [report["layers"][n]["bitrate"] for n in layers]
    axes[1].bar(x - 0.19, [r["bitrate"] for r in rates], 0.38, label="per frame", color="tab:green")
    axes[1].bar(x + 0.19, [r["bitrate_rle"] for r in rates], 0.38, label="repeats merged", color="tab:olive")
    axes[1].set_xticks(x, layers)
    axes[1].set(ylabel="bits / second", title="bitrate (ZeroSpeech 2019)")
    if layers:
        axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown tables."""
    lines = [f"# Unit analysis: {report.get('checkpoint', '')}", "",
             f"Corpus `{report.get('corpus', '')}`, split `{report.get('split', '')}`: {report['n_utterances']} "
             f"utterances ({report['duration_s'] / 60:.1f} min); ABX on {report['n_abx_utterances']} of them.", ""]
    for note in report.get("notes", []):
        lines.append(f"* note: {note}")
    if report["layers"]:
        lines += ["", "## VQ layers", "", "| layer | codes used / K | frame shift | words detected (F1 ≥ 0.5) | "
                  "mean F1, top N | bitrate (b/s) | bitrate, repeats merged |", "|---|---|---|---|---|---|---|"]
        for name, layer in report["layers"].items():
            wd = layer.get("word_detection")
            detected = f"{wd['n_detected']} / {wd['n_words']} ({_pct(wd['fraction_detected'])})" if wd else "-"
            top = f"{_pct(wd['mean_f1_top'])} (N = {wd['top_n']})" if wd else "-"
            br = layer["bitrate"]
            lines.append(f"| {name} | {layer['codes_used']} / {layer['codebook_size']} | "
                         f"{1000 * layer['frame_shift_s']:.0f} ms | {detected} | {top} | {br['bitrate']:.1f} | "
                         f"{br['bitrate_rle']:.1f} |")
    if report.get("any_layer"):
        any_layer = report["any_layer"]
        lines += ["", f"Words detected in some layer: {any_layer['n_detected']} / {any_layer['n_words']} "
                      f"({_pct(any_layer['fraction_detected'])})."]
    if report.get("by"):
        names = list(report["layers"])
        lines += ["", f"## Words detected per group ({report.get('group_by', '')})", "",
                  "| group | utterances | " + " | ".join(names) + " | some layer |",
                  "|---|---|" + "---|" * len(names) + "---|"]
        for group, row in report["by"].items():
            cells = [f"{row['layers'][n]['n_detected']} / {row['layers'][n]['n_words']}" for n in names]
            any_layer = row["any_layer"]
            lines.append(f"| {group} | {row['n_utterances']} | " + " | ".join(cells) +
                         f" | {any_layer['n_detected']} / {any_layer['n_words']} ({_pct(any_layer['fraction_detected'])}) |")
        shared = report.get("shared_codes") or {}
        lines += ["", "Words whose best code is the same in every group: " + ", ".join(
            f"{n} {r['n_same_code']} of {r['n_words']}" for n, r in shared.items()) + "."]
    if report["abx"]:
        lines += ["", f"## ABX error ({report['abx_context']} context; chance = 50%)", "",
                  "| representation | within speakers | across speakers |", "|---|---|---|"]
        lines += [f"| {name} | {_pct(r['within'])} | {_pct(r['across'])} |" for name, r in report["abx"].items()]
        if report.get("abx_best"):
            best = report["abx_best"]
            lines += ["", f"Best across speakers: {best['representation']}, {_pct(best['across'])} = "
                          f"{best['ratio']:.2f} x MFCC's {_pct(best['mfcc_across'])}."]
    for name, layer in report["layers"].items():
        rows = layer.get("best_words") or []
        if rows:
            lines += ["", f"## {name}: best code per word", "", f"![F1 scatter](f1_{name}.png)", "",
                      "| word | code | precision | recall | F1 | occurrences |", "|---|---|---|---|---|---|"]
            lines += [f"| {r['word']} | {r['code']} | {_pct(r['precision'])} | {_pct(r['recall'])} | {_pct(r['f1'])} | "
                      f"{r['word_count']} |" for r in rows[:20]]
            lines += ["", f"Full table: `words_{name}.tsv`."]
    lines += ["", "![summary](summary.png)", ""]
    return "\n".join(lines)


def write_report(report: dict[str, Any], tables: dict[str, CodeWordTable], out_dir: str | Path) -> Path:
    """Write report.json, report.md, the code-word tables and the plots into ``out_dir``."""
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        table.to_tsv(out / f"words_{name}.tsv")
        plot_f1(table, name, out / f"f1_{name}.png")
    plot_summary(report, out / "summary.png")
    (out / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
    (out / "report.md").write_text(markdown(report), encoding="utf-8")
    return out


# ---------------------------------------------------------------------------------------------
# the CLI
# ---------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a model folder (model.safetensors + config.json), a run folder or a name")
    parser.add_argument("--data", default=None, help="prepared corpus (default: the one the checkpoint was trained "
                                                     "on, else the built-in corpus)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--layer", action="append", default=None, metavar="NAME",
                        help="VQ layer to analyse, e.g. vq2 (repeatable; default: all of the model's VQ layers)")
    parser.add_argument("--max-utts", type=int, default=0, help="analyse N random utterances of the split (0 = all)")
    parser.add_argument("--abx-utts", type=int, default=500,
                        help="utterances used for ABX, a random subset of the analysed ones (0 = all)")
    parser.add_argument("--abx-context", choices=("within", "any", "off"), default="within",
                        help="ABX condition: same neighbouring phones (ZeroSpeech's triphones), any, or no ABX")
    parser.add_argument("--abx-max-group", type=int, default=10, help="ABX: tokens per (context, speaker, phone)")
    parser.add_argument("--abx-max-dtw", type=int, default=2_000_000,
                        help="ABX: at most this many DTWs per representation (0 = no limit)")
    parser.add_argument("--top-n", type=int, default=250, help="mean F1 over the N best-detected words")
    parser.add_argument("--by", default=None, metavar="FIELD",
                        help="also detect words within each group of utterances, grouped like evaluate --by: "
                             "a record field (speaker) or FIELD~REGEX ('speaker~^([^+]+)': per accent)")
    parser.add_argument("--out", default=None, help="report folder (default: runs/analysis/units-<checkpoint>-<split>)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)


def run(checkpoint: str, *, data: str | None = None, split: str = "test", layers: Sequence[str] | None = None,
        max_utts: int = 0, abx_utts: int = 500, abx_context: str = "within", abx_max_group: int = 10,
        abx_max_dtw: int = 2_000_000, top_n: int = 250, batch_size: int = 16, device: str = "cpu", seed: int = 0,
        by: str | None = None, progress: bool = False) -> tuple[dict[str, Any], dict[str, CodeWordTable]]:
    """Load a checkpoint and a corpus split and analyse the units: (report, code-word tables)."""
    from s2i.datasets.corpus import read_corpus, read_split
    from s2i.evaluate import default_data, group_key, model_folder
    from s2i.model import load

    folder = model_folder(checkpoint)
    model = load(folder, device=device)
    available = list(getattr(model.speech, "vq", {}).keys())
    if layers:
        unknown = [name for name in layers if name not in available]
        if unknown:
            raise AnalysisError(f"{folder} has no VQ layer {', '.join(unknown)}; its VQ layers are "
                                f"{', '.join(available) or 'none'}")
    layers = list(layers or available)
    if not layers:
        log.warning("%s has no VQ layers: only ABX of MFCCs and of the layers' activations is measured", folder)
    corpus = data or default_data(folder)
    info = read_corpus(corpus)
    records = read_split(info, split)
    if not records:
        raise AnalysisError(f"split {split!r} of {corpus} has no utterances")
    rng = np.random.default_rng(seed)
    chosen = _choose(len(records), max_utts, rng)
    records = [records[i] for i in chosen]
    keys = None
    if by:
        try:
            keys = [group_key(r, by) for r in records]
        except ValueError as e:
            raise AnalysisError(str(e)) from None
    abx_index = _choose(len(records), abx_utts, rng) if abx_context != "off" else np.zeros(0, dtype=np.int64)
    data_ = collect(model, records, info.audio_path, layers=layers, abx_index=abx_index, batch_size=batch_size,
                    progress=progress)
    report, tables = analyze(data_, top_n=top_n, abx_context=abx_context, abx_max_group=abx_max_group,
                             abx_max_dtw=abx_max_dtw, seed=seed, group_keys=keys, progress=progress)
    report = {"checkpoint": str(folder), "model": model.config.name, "corpus": str(info.root), "split": split,
              **({"group_by": by} if by else {}), **report}
    return report, tables


def main(args: argparse.Namespace) -> int:
    report, tables = run(args.checkpoint, data=args.data, split=args.split, layers=args.layer,
                         max_utts=args.max_utts, abx_utts=args.abx_utts, abx_context=args.abx_context,
                         abx_max_group=args.abx_max_group, abx_max_dtw=args.abx_max_dtw, top_n=args.top_n,
                         batch_size=args.batch_size, device=args.device, seed=args.seed, by=args.by,
                         progress=not args.json)
    name = Path(report["checkpoint"]).name
    out = Path(args.out) if args.out else Path("runs") / "analysis" / f"units-{name}-{args.split}"
    write_report(report, tables, out)
    report["report_dir"] = str(out)
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
        return 0
    print(f"{report['checkpoint']} on {report['corpus']} ({report['split']}): {report['n_utterances']} utterances, "
          f"{report['duration_s'] / 60:.1f} min; ABX on {report['n_abx_utterances']}")
    for name, layer in report["layers"].items():
        wd, br = layer.get("word_detection"), layer["bitrate"]
        words = (f"words F1>=0.5: {wd['n_detected']}/{wd['n_words']}  mean F1 top-{wd['top_n']}: "
                 f"{_pct(wd['mean_f1_top'])}  " if wd else "")
        print(f"{name}: {layer['codes_used']}/{layer['codebook_size']} codes used  {words}"
              f"bitrate {br['bitrate']:.1f} b/s (repeats merged {br['bitrate_rle']:.1f})")
    if report.get("any_layer"):
        any_layer = report["any_layer"]
        print(f"words F1>=0.5 in some layer: {any_layer['n_detected']}/{any_layer['n_words']}")
    for group, row in report.get("by", {}).items():
        layers = "  ".join(f"{n} {r['n_detected']}" for n, r in row["layers"].items())
        print(f"  {report['group_by']} = {group} ({row['n_utterances']} utterances): {layers}  "
              f"some layer {row['any_layer']['n_detected']}/{row['any_layer']['n_words']}")
    if report.get("shared_codes"):
        print("  same best code in every group: " + "  ".join(
            f"{n} {r['n_same_code']}/{r['n_words']} words" for n, r in report["shared_codes"].items()))
    if report["abx"]:
        print(f"ABX error ({report['abx_context']} context)   within   across")
        width = max(len(n) for n in report["abx"])
        for name, r in report["abx"].items():
            print(f"  {name:<{width}}  {_pct(r['within']):>7}  {_pct(r['across']):>7}")
        if report.get("abx_best"):
            best = report["abx_best"]
            print(f"best across speakers: {best['representation']} = {best['ratio']:.2f} x MFCC")
    for note in report["notes"]:
        print(f"note: {note}")
    print(f"report: {out}/report.md")
    return 0
