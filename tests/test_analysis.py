"""Unit-discovery metrics on hand-built alignments with known answers, and the ``analyze units`` CLI."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from s2i.analysis import abx, bitrate, code_segments, code_word_table, segments_for_code, word_detection
from s2i.analysis.abx import ABXError, _dtw
from s2i.analysis.bitrate import BitrateError, entropy_bits
from s2i.analysis.words import STOP_WORDS, WordDetectionError

H = 0.02  # frame shift of the hand-built code sequences


# ---------------------------------------------------------------------------------------------
# hand-built corpora
# ---------------------------------------------------------------------------------------------
def tracked_corpus(n_utts=30, seed=0, stop=("the", "a"), content=("red", "circle", "blue", "square", "green", "star")):
    """Utterances of random words; each word type has its own code over exactly its frames, silence is code 0."""
    rng = np.random.default_rng(seed)
    vocab = list(content) + list(stop)
    code_of = {w: i + 1 for i, w in enumerate(vocab)}
    codes, words = [], []
    for _ in range(n_utts):
        seq, align, t = [0] * 5, [], 5
        for w in rng.choice(vocab, size=rng.integers(3, 7)):
            n = int(rng.integers(8, 20))
            align.append((str(w), t * H, (t + n) * H))
            seq += [code_of[w]] * n
            t += n
            gap = int(rng.integers(1, 3))  # a pause, so a repeated word is two segments
            seq += [0] * gap
            t += gap
        codes.append(np.array(seq + [0] * 5))
        words.append(align)
    return codes, words, code_of


def test_code_segments_merge_runs_and_drop_padding():
    assert code_segments([3, 3, 5, 5, 5, 3, -1, -1], 0.02) == [(3, 0.0, 0.04), (5, 0.04, 0.1), (3, 0.1, 0.12)]
    assert code_segments(np.array([], dtype=int), 0.02) == []
    with pytest.raises(WordDetectionError):
        code_segments([1, -1, 2], 0.02)
    with pytest.raises(ValueError):
        code_segments([1, 2], 0.0)


def test_code_that_tracks_a_word_exactly_has_f1_one():
    codes, words, code_of = tracked_corpus()
    wd = word_detection(codes, words, H)
    assert wd.n_words == 6 and wd.n_detected == 6 and wd.fraction_detected == 1.0
    assert wd.mean_f1_top == pytest.approx(1.0) and wd.top_n == 6  # N = 250 capped at the 6 words
    for row in wd.best.rows():
        assert row["code"] == code_of[row["word"]]
        assert row["precision"] == pytest.approx(1.0) and row["recall"] == pytest.approx(1.0)
        assert row["code_hits"] == row["code_segments"]  # every segment of the code hits its word
        assert row["count"] == row["word_count"]  # and the code occurs in every occurrence of it
    # no other code ever occurs inside a word (recall 0), so the table holds just these pairs
    assert len(wd.table) == 6
    # the "red" code also flickers in the middle of every "blue": a second, weaker pair, listed after
    flicker = [c.copy() for c in codes]
    for c, utt in zip(flicker, words):
        for w, start, end in utt:
            if w == "blue":
                mid = int(round((start + end) / 2 / H))
                c[mid:mid + 2] = code_of["red"]
    table = code_word_table(flicker, words, H)
    assert len(table) == 7 and np.all(np.diff(table.f1) <= 0)
    red_blue = table.for_code(code_of["red"]).for_word("blue")
    assert red_blue.recall[0] == 1.0 and 0 < red_blue.precision[0] < 1
    # pairs seen in fewer word occurrences than min_count are dropped
    n_blue = int(red_blue.word_count[0])
    assert len(code_word_table(flicker, words, H, min_count=n_blue + 1).for_word("blue")) == 0
    assert len(code_word_table(flicker, words, H, min_count=n_blue).for_code(code_of["red"])) == 2


def test_stop_words_are_excluded():
    codes, words, code_of = tracked_corpus()
    table = code_word_table(codes, words, H)
    assert not ({"the", "a"} & set(table.word.tolist()))
    assert {"the", "a"} <= STOP_WORDS
    # without the stop-word list they are words like any other, and tracked perfectly
    wd = word_detection(codes, words, H, stop_words=())
    assert wd.n_words == 8 and wd.n_detected == 8
    # capitals and punctuation do not make new words
    shouted = [[(w.upper() + ",", s, e) for w, s, e in utt] for utt in words]
    assert word_detection(codes, shouted, H).n_detected == 6
    # an aligner's merged function words ("of a", eSpeak) are stop words too; "plus sign" is not
    merged = [[("of the" if w == "the" else "plus sign" if w == "red" else w, s, e) for w, s, e in utt] for utt in words]
    merged_words = set(code_word_table(codes, merged, H).word.tolist())
    assert "of the" not in merged_words and "plus sign" in merged_words


def test_random_codes_detect_no_words():
    codes, words, _ = tracked_corpus(n_utts=60)
    rng = np.random.default_rng(1)
    random_codes = [rng.integers(0, 64, size=len(c)) for c in codes]
    wd = word_detection(random_codes, words, H)
    assert wd.n_detected == 0
    assert wd.mean_f1_top < 0.3
    assert wd.best.f1.max() < 0.4


def test_window_edges():
    # one utterance at 10 ms frames: code 7 covers the word "dog" (frames 20..39) and once more a
    # short segment whose ±40 ms window either just touches the word (not counted) or overlaps it.
    def precision(isolated_frames):
        seq = np.zeros(50, dtype=int)
        seq[isolated_frames] = 7
        seq[20:40] = 7
        table = code_word_table([seq], [[("dog", 0.20, 0.40)]], 0.01).for_code(7)
        return float(table.precision[0]), int(table.code_segments[0])

    assert precision([15, 16]) == (0.5, 2)  # centre 0.16 s: window [0.12, 0.20] only touches 0.20
    assert precision([16, 17]) == (1.0, 2)  # centre 0.17 s: window [0.13, 0.21] overlaps
    # a narrower window, same segment: no longer reaches the word
    seq = np.zeros(50, dtype=int)
    seq[[16, 17]] = 7
    seq[20:40] = 7
    assert float(code_word_table([seq], [[("dog", 0.2, 0.4)]], 0.01, window=0.02).for_code(7).precision[0]) == 0.5


def test_recall_counts_occurrences_and_short_words_take_the_middle_frame():
    # "cat" twice; code 4 is inside the first occurrence only -> recall 1/2
    seq = np.array([0] * 10 + [4] * 10 + [0] * 20 + [5] * 10 + [0] * 10)
    words = [[("cat", 0.1, 0.2), ("cat", 0.4, 0.5)]]
    table = code_word_table([seq], words, 0.01)
    assert table.for_code(4).recall[0] == 0.5 and table.for_code(5).recall[0] == 0.5
    # a 5 ms word between frame centres still gets the frame under its middle
    seq = np.array([0, 0, 9, 0, 0])
    table = code_word_table([seq], [[("hi", 0.081, 0.086)]], 0.04)
    assert table.for_code(9).recall[0] == 1.0


def test_segments_for_code_lists_occurrences_with_their_words():
    codes, words, code_of = tracked_corpus(n_utts=5)
    ids = [f"u{i}" for i in range(5)]
    occ = segments_for_code(code_of["red"], codes, H, words=words, utt_ids=ids)
    expected = [(f"u{u}", s, e) for u, utt in enumerate(words) for w, s, e in utt if w == "red"]
    assert [(o.utt, round(o.start, 6), round(o.end, 6)) for o in occ] == \
        [(u, round(s, 6), round(e, 6)) for u, s, e in expected]
    assert all("red" in o.words for o in occ)
    assert len(segments_for_code(code_of["red"], codes, H, limit=1)) == min(1, len(expected))


def test_word_detection_rejects_bad_input():
    with pytest.raises(WordDetectionError, match="one alignment per utterance"):
        word_detection([np.zeros(3, dtype=int)], [], H)
    with pytest.raises(WordDetectionError, match="no content words"):
        word_detection([np.zeros(3, dtype=int)], [[("the", 0.0, 0.04)]], H)
    with pytest.raises(WordDetectionError, match="start_s"):
        word_detection([np.zeros(3, dtype=int)], [[("dog",)]], H)


# ---------------------------------------------------------------------------------------------
# ABX
# ---------------------------------------------------------------------------------------------
def phone_corpus(seed=0, speakers=("s1", "s2", "s3"), utts=6, phones="abcd", noise=0.1, dim=8, shift=0.01):
    """Random phone strings; each phone's frames are its prototype plus noise."""
    rng = np.random.default_rng(seed)
    protos = rng.normal(size=(len(phones), dim))
    feats, aligns, spk, codes = [], [], [], []
    for s in speakers:
        for _ in range(utts):
            f, c, align, t = [], [], [], 0
            for p in rng.integers(0, len(phones), size=12):
                n = int(rng.integers(3, 9))
                f.append(protos[p] + noise * rng.normal(size=(n, dim)))
                c.append(np.full(n, p))
                align.append((phones[p], round(t * shift, 4), round((t + n) * shift, 4)))
                t += n
            feats.append(np.concatenate(f).astype(np.float32))
            codes.append(np.concatenate(c))
            aligns.append(align)
            spk.append(s)
    return feats, codes, aligns, spk


def test_dtw_is_path_normalised():
    d = np.array([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]], dtype=np.float32)
    # best path (0,0) -> (1,0) -> (2,1): cost 1 + 3 + 6 over 3 steps
    assert _dtw(d, np.array([3]), np.array([2]))[0] == pytest.approx(10 / 3)
    # a shorter valid region of a padded matrix ignores the padding
    assert _dtw(d, np.array([1]), np.array([1]))[0] == pytest.approx(1.0)
    assert _dtw(np.zeros((1, 4, 4), np.float32), np.array([4]), np.array([2]))[0] == 0.0


@pytest.mark.parametrize("context", ["within", "any"])
def test_abx_separable_phones_score_zero(context):
    feats, codes, aligns, spk = phone_corpus()
    res = abx(feats, 0.01, aligns, spk, context=context)
    assert res.within == 0.0 and res.across == 0.0
    assert res.n_pairs_within == 12 and res.n_pairs_across == 12  # all ordered pairs of 4 phones
    # codes that name the phone are just as separable, compared one-hot or through a codebook
    assert abx(codes, 0.01, aligns, spk, context=context).within == 0.0
    assert abx(codes, 0.01, aligns, spk, context=context, codebook=np.eye(4) + 0.1).across == 0.0


def test_abx_identical_features_score_chance():
    feats, codes, aligns, spk = phone_corpus()
    same = [np.ones_like(f) for f in feats]
    res = abx(same, 0.01, aligns, spk)
    assert res.within == 0.5 and res.across == 0.5
    constant_codes = [np.zeros_like(c) for c in codes]
    assert abx(constant_codes, 0.01, aligns, spk, speaker_modes=["within"]).within == 0.5
    # a codebook whose vectors all point one way carries no information either
    assert abx(codes, 0.01, aligns, spk, codebook=np.ones((4, 3))).across == 0.5


def test_abx_noise_degrades_gracefully_and_sampling_is_seeded():
    feats, _, aligns, spk = phone_corpus(noise=2.0)
    a = abx(feats, 0.01, aligns, spk, context="any", max_size_group=4, seed=3)
    b = abx(feats, 0.01, aligns, spk, context="any", max_size_group=4, seed=3)
    assert a == b
    assert 0.0 < a.within < 0.5 and 0.0 < a.across < 0.5
    assert a.n_items <= 4 * 4 * 3  # at most 4 tokens per (speaker, phone)


def test_abx_frame_shift_and_silence():
    # features at 20 ms frames: read with the right frame shift the tokens line up, with a wrong one not
    feats, _, aligns, spk = phone_corpus(shift=0.02)
    assert abx(feats, 0.02, aligns, spk).within == 0.0
    assert abx(feats, 0.01, aligns, spk).within > 0.05
    # silence labels are never tokens: a corpus whose phones are all silence has nothing to score
    with pytest.raises(ABXError, match="no phone tokens"):
        abx(feats[:2], 0.01, [[("sil", 0.0, 0.1)], [("_", 0.0, 0.1)]], spk[:2])


def test_abx_context_stops_at_pauses_and_silence():
    from s2i.analysis.abx import _phone_items

    aligns = [[("k", 0.0, 0.1), ("a", 0.1, 0.2), ("t", 0.2, 0.3)],  # k_t
              [("k", 0.0, 0.1), ("a", 0.15, 0.25), ("t", 0.25, 0.3)],  # a pause before: #_t
              [("k", 0.0, 0.1), ("sil", 0.1, 0.15), ("a", 0.15, 0.25), ("t", 0.25, 0.3)]]  # silence: #_t
    items, phones = _phone_items(aligns, ["s"] * 3, np.array([30] * 3), np.full(3, 0.01), "within")
    a = items.phone == phones.index("a")
    ctx = items.context[a]
    assert ctx[0] != ctx[1] and ctx[1] == ctx[2]
    assert "sil" not in phones and items.phone.size == 9


def test_abx_dtw_budget(caplog):
    feats, _, aligns, spk = phone_corpus(noise=1.0)
    full = abx(feats, 0.01, aligns, spk, context="any", max_dtw=None)
    with caplog.at_level("WARNING"):
        capped = abx(feats, 0.01, aligns, spk, context="any", max_dtw=2000)
    assert "max_dtw" in caplog.text
    assert capped.within is not None and abs(capped.across - full.across) < 0.15


def test_abx_rejects_bad_input():
    feats, codes, aligns, spk = phone_corpus(utts=1)
    with pytest.raises(ABXError, match="one of each"):
        abx(feats, 0.01, aligns[:-1], spk)
    with pytest.raises(ABXError, match="context"):
        abx(feats, 0.01, aligns, spk, context="triphone")
    with pytest.raises(ABXError, match="integers"):
        abx([c.astype(float) for c in codes], 0.01, aligns, spk)
    with pytest.raises(ABXError, match="codebook"):
        abx(codes, 0.01, aligns, spk, codebook=np.eye(2))


def test_abx_matches_libri_light_abx2(tmp_path):
    """Our ABX gives libri-light-abx2's numbers (PyPI zerospeech-libriabx2) on the same features."""
    pytest.importorskip("zrc_abx2")
    from zrc_abx2.eval_ABX import EvalABX, EvalArgs

    feats, codes, aligns, spk = phone_corpus(seed=1, utts=4, noise=1.2, dim=6)
    onehot = [np.eye(4, dtype=np.float32)[c] for c in codes]
    lines = ["#file onset offset #phone prev-phone next-phone speaker"]
    for u, (align, s) in enumerate(zip(aligns, spk)):
        for k, (p, start, end) in enumerate(align):
            prev = align[k - 1][0] if k else "#"
            nxt = align[k + 1][0] if k + 1 < len(align) else "#"
            # libri-light keeps frames [ceil(on/h - .5), floor(off/h - .5)); ours end at ceil(off/h - .5)
            lines.append(f"u{u} {start:.4f} {end + 0.01:.4f} {p} {prev} {nxt} {s}")
    (tmp_path / "x.item").write_text("\n".join(lines) + "\n")
    for name, data in (("feats", feats), ("onehot", onehot)):
        (tmp_path / name).mkdir()
        for u, f in enumerate(data):
            np.save(tmp_path / name / f"u{u}.npy", f)
    for context in ("within", "any"):
        for name, ours_input in (("feats", feats), ("onehot", codes)):
            ours = abx(ours_input, 0.01, aligns, spk, context=context, max_size_group=1000)
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ref = EvalABX().eval_abx(EvalArgs(path_data=str(tmp_path / name), context_mode=context,
                                                  path_item_file=str(tmp_path / "x.item"), max_size_group=1000))
            ref = {r["abx-s-condition"]: r["score"] for r in ref}
            assert ours.within == pytest.approx(ref["within"], abs=1e-6)
            assert ours.across == pytest.approx(ref["across"], abs=1e-6)


# ---------------------------------------------------------------------------------------------
# bitrate
# ---------------------------------------------------------------------------------------------
def test_bitrate_of_known_sequences():
    r = bitrate([[0, 1, 0, 1]], durations=[1.0])  # 4 symbols/s x 1 bit
    assert r.bitrate == pytest.approx(4.0) and r.bitrate_rle == pytest.approx(4.0)
    r = bitrate([[0, 0, 1, 1]], durations=[1.0])  # runs 0 1: 2 symbols/s x 1 bit
    assert r.bitrate == pytest.approx(4.0) and r.bitrate_rle == pytest.approx(2.0)
    assert bitrate([[5] * 10], durations=[1.0]).bitrate == 0.0
    r = bitrate([list(range(8))], durations=[2.0])  # 4 symbols/s x 3 bits
    assert r.bitrate == pytest.approx(12.0) and r.entropy == pytest.approx(3.0)
    # the distribution is pooled over utterances, repeats merged within an utterance only
    r = bitrate([[0, 0], [0, 1, 1, -1]], frame_shift=0.5)
    assert r.duration == pytest.approx(2.5) and r.n_symbols == 5 and r.n_symbols_rle == 3  # runs: 0 | 0 1
    assert r.bitrate == pytest.approx(5 / 2.5 * entropy_bits(np.array([0, 0, 0, 1, 1])))
    assert r.bitrate_rle == pytest.approx(3 / 2.5 * entropy_bits(np.array([0, 0, 1])))
    assert entropy_bits(np.array([0, 1, 2, 3])) == pytest.approx(2.0)


def test_bitrate_needs_durations():
    with pytest.raises(BitrateError):
        bitrate([[0, 1]])
    with pytest.raises(BitrateError):
        bitrate([[0, 1]], durations=[1.0, 2.0])
    with pytest.raises(BitrateError):
        bitrate([[0, 1]], durations=[0.0])


# ---------------------------------------------------------------------------------------------
# the report and the CLI
# ---------------------------------------------------------------------------------------------
def test_report_writing(tmp_path):
    from s2i.analysis.units import Collected, analyze, write_report

    feats, phone_codes, aligns, spk = phone_corpus(utts=3)
    codes, words, _ = tracked_corpus(n_utts=len(feats))
    n = len(feats)
    data = Collected(utt_ids=[f"u{i}" for i in range(n)], speakers=spk, words=words, phones=aligns,
                     durations=np.array([len(c) * H for c in codes]), codes={"vq2": codes, "vq3": phone_codes},
                     frame_shift={"vq2": H, "vq3": 0.01, "layer0": 0.01, "mfcc": 0.01},
                     codebooks={"vq2": np.eye(16), "vq3": np.eye(8)}, abx_index=np.arange(n), hidden={"layer0": feats},
                     mfcc=feats)
    report, tables = analyze(data, abx_context="within")
    assert report["layers"]["vq2"]["word_detection"]["n_detected"] == 6
    # a word counts for "some layer" when either layer's best code for it has F1 >= 0.5
    union = {r["word"] for layer in report["layers"].values() for r in layer["best_words"] if r["f1"] >= 0.5}
    assert report["any_layer"]["n_detected"] == len(union) >= 6
    assert report["any_layer"]["n_words"] == report["layers"]["vq2"]["word_detection"]["n_words"]
    assert report["abx"]["vq3 codes"]["within"] == 0.0 and report["abx"]["mfcc"]["across"] == 0.0
    assert set(report["abx"]) == {"mfcc", "vq2 codes", "vq2 vectors", "vq3 codes", "vq3 vectors", "layer0"}
    out = write_report(report, tables, tmp_path / "rep")
    for name in ("report.json", "report.md", "summary.png", "f1_vq2.png", "words_vq2.tsv"):
        assert (out / name).stat().st_size > 0, name
    assert f"Words detected in some layer: {len(union)} / " in (out / "report.md").read_text()
    assert json.loads((out / "report.json").read_text())["layers"]["vq2"]["best_words"][0]["f1"] == 1.0
    header = (out / "words_vq2.tsv").read_text().splitlines()[0].split("\t")
    assert header == ["code", "word", "precision", "recall", "f1", "count", "code_hits", "code_segments", "word_count"]


def test_word_detection_by_group():
    """Two voices: one whose codes track its words, one whose codes are noise; each group is counted alone."""
    from s2i.analysis.units import Collected, analyze, markdown

    tracked, words, _ = tracked_corpus(n_utts=20, seed=1)
    rng = np.random.default_rng(2)
    noise = [rng.integers(0, 50, size=len(c)) for c in tracked[10:]]
    codes = tracked[:10] + noise
    n = len(codes)
    data = Collected(utt_ids=[f"u{i}" for i in range(n)], speakers=["en+m1"] * 10 + ["en-029+f2"] * 10,
                     words=words, phones=[[] for _ in range(n)], durations=np.array([len(c) * H for c in codes]),
                     codes={"vq2": codes}, frame_shift={"vq2": H}, codebooks={"vq2": np.eye(50)},
                     abx_index=np.zeros(0, dtype=np.int64))
    keys = ["en"] * 10 + ["en-029"] * 10
    report, _ = analyze(data, abx_context="off", group_keys=keys)
    by = report["by"]
    assert by["en"]["n_utterances"] == 10 and by["en-029"]["n_utterances"] == 10
    assert by["en"]["any_layer"]["n_detected"] == by["en"]["any_layer"]["n_words"] == 6
    assert by["en"]["layers"]["vq2"]["n_detected"] == 6
    assert by["en-029"]["any_layer"]["n_detected"] == 0
    assert by["en"]["layers"]["vq2"]["best"]["red"] == [1, 1.0]  # tracked_corpus codes words from 1 up
    assert report["shared_codes"]["vq2"]["n_words"] == 6 and report["shared_codes"]["vq2"]["n_same_code"] < 6
    # a voice that renames every code (a unit per group) is found within each group, not across them
    renamed = tracked[:10] + [c + 10 * (c > 0) for c in tracked[10:]]
    data.codes = {"vq2": renamed}
    split, _ = analyze(data, abx_context="off", group_keys=keys)
    assert split["by"]["en"]["any_layer"]["n_detected"] == split["by"]["en-029"]["any_layer"]["n_detected"] == 6
    assert split["shared_codes"]["vq2"] == {"n_words": 6, "n_same_code": 0}
    # across both groups each code covers only its group's share of the word's occurrences
    assert max(r["f1"] for r in split["layers"]["vq2"]["best_words"]) < 0.9
    data.codes = {"vq2": tracked}
    same, _ = analyze(data, abx_context="off", group_keys=keys)
    assert same["shared_codes"]["vq2"] == {"n_words": 6, "n_same_code": 6} and same["any_layer"]["n_detected"] == 6
    data.codes = {"vq2": codes}
    # the whole set sits in between: the tracked voice's codes still win some words
    assert 0 < report["any_layer"]["n_detected"] <= 6
    md = markdown({**report, "group_by": "speaker~^([^+]+)"})
    assert "| en | 10 | 6 / 6 | 6 / 6 (100.0%) |" in md and "the same in every group: vq2 " in md
    assert "by" not in analyze(data, abx_context="off")[0]
    # a group without content words is a note, not a failure of the whole report
    data.words = words[:19] + [[("the", 0.1, 0.2)]]
    noted, _ = analyze(data, abx_context="off", group_keys=keys[:19] + ["stop words only"])
    assert set(noted["by"]) == {"en", "en-029"} and any("'stop words only'" in n for n in noted["notes"])


def _tiny_corpus(root: Path) -> Path:
    """A few real spoken utterances with word and phone alignments (eSpeak), in the prepared format."""
    import soundfile

    from s2i.audio import to_mono_16k
    from s2i.datasets.corpus import Manifest, write_corpus
    from s2i.datasets.speech_synthesis import synthesize

    (root / "audio").mkdir(parents=True)
    (root / "images").mkdir()
    texts = ["a red circle above a blue square", "a blue star left of a red circle", "the green square is small",
             "a small red star", "a big blue circle below a green star", "the red square"]
    records = []
    for i, text in enumerate(texts):
        voice = ("en-us", "en-gb-x-rp")[i % 2]
        utt = synthesize(text, voice=voice)
        wave = to_mono_16k(utt.audio, utt.sample_rate).numpy()
        soundfile.write(root / "audio" / f"u{i}.wav", wave, 16000)
        records.append({"utt_id": f"u{i}", "image_id": f"i{i}", "image": f"i{i}.png", "audio": f"u{i}.wav",
                        "text": text, "speaker": voice, "words": [list(w) for w in utt.words],
                        "phones": [list(p) for p in utt.phones]})
    write_corpus(root, Manifest(name="tiny", splits={"test": records}, image_root="images", audio_root="audio"))
    return root


def test_cli_analyze_units(tmp_path):
    pytest.importorskip("s2i.model")
    from s2i.config import preset
    from s2i.model import build_model, save

    corpus = _tiny_corpus(tmp_path / "corpus")
    config, _ = preset("resdavenet_vq_small")
    config.image.arch, config.text = "cnn", None  # no pretrained weights, no caption vocabulary needed
    ckpt = save(build_model(config), tmp_path / "ckpt")
    out = tmp_path / "report"
    r = subprocess.run([sys.executable, "-m", "s2i", "analyze", "units", str(ckpt), "--data", str(corpus),
                        "--split", "test", "--out", str(out), "--json", "--abx-context", "any"],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["n_utterances"] == 6
    layers = [n for n, c in enumerate(config.speech.vq_positions) if c == "1"]
    assert set(report["layers"]) == {f"vq{p}" for p in layers}
    for layer in report["layers"].values():
        assert layer["word_detection"]["n_words"] > 5  # red, circle, blue, square, ...
        assert layer["bitrate"]["bitrate"] >= layer["bitrate"]["bitrate_rle"] >= 0
    assert "mfcc" in report["abx"] and report["abx"]["mfcc"]["within"] is not None
    assert (out / "report.md").is_file() and (out / "summary.png").is_file()
    # per accent: the corpus's two voices, three utterances each
    r = subprocess.run([sys.executable, "-m", "s2i", "analyze", "units", str(ckpt), "--data", str(corpus),
                        "--out", str(out), "--json", "--abx-context", "off", "--by", "speaker~^([^-]+)"],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["group_by"] == "speaker~^([^-]+)" and set(report["by"]) == {"en"}
    assert report["by"]["en"]["n_utterances"] == 6
    r = subprocess.run([sys.executable, "-m", "s2i", "analyze", "units", str(ckpt), "--data", str(corpus),
                        "--out", str(out), "--abx-context", "off", "--by", "accent"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "no field 'accent'" in r.stderr
    # a layer the model does not have is a one-line error
    r = subprocess.run([sys.executable, "-m", "s2i", "analyze", "units", str(ckpt), "--data", str(corpus),
                        "--layer", "vq9"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "no VQ layer vq9" in r.stderr and r.stderr.count("\n") == 1
