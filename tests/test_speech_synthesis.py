import ctypes
import hashlib
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from s2i.datasets.speech_synthesis import (ACCENTS, FOREIGN_ACCENTS, SynthesisError, Utterance, _Event, list_voices,
                                          synthesize)

TEXT = "a small red circle above a big blue star"


def _check_alignment(utt: Utterance) -> None:
    duration = utt.duration
    for seq in (utt.words, utt.phones):
        assert seq
        starts = [s for _, s, _ in seq]
        assert starts == sorted(starts)
        for (_, s, e), nxt in zip(seq, seq[1:] + [None]):
            assert 0.0 <= s < e <= duration + 1e-9
            if nxt is not None:
                assert e <= nxt[1] + 1e-9  # no overlap
    for _, s, e in utt.phones:  # every phone lies inside one word or a pause
        inside = [w for w in utt.words if w[1] - 1e-9 <= s and e <= w[2] + 1e-9]
        gap = all(e <= w[1] + 1e-9 or s >= w[2] - 1e-9 for w in utt.words)
        assert inside or gap


def test_event_struct_matches_speak_lib_h():
    # int type, uint id, 4 ints, void*, union{int, char*, char[8]} on a 64-bit ABI
    assert _Event.user_data.offset == 24
    assert _Event.id.offset == 32
    assert ctypes.sizeof(_Event) == 40


def test_synthesize_gives_audio_and_alignments():
    utt = synthesize(TEXT)
    assert utt.sample_rate == 22050
    assert utt.audio.dtype == np.float32 and utt.audio.ndim == 1
    assert 1.0 < utt.duration < 5.0
    assert 0.01 < float(np.abs(utt.audio).max()) <= 1.0
    assert " ".join(w for w, _, _ in utt.words) == TEXT
    assert len(utt.phones) >= len(TEXT.split())
    _check_alignment(utt)
    # stress marks are stripped from phone labels
    assert not any(c in p for p, _, _ in utt.phones for c in "ˈˌ")


def test_punctuation_pauses_and_merged_words():
    utt = synthesize("Red circle. Then, a blue star to the left of a heart!", variant="klatt")
    _check_alignment(utt)
    words = " ".join(w for w, _, _ in utt.words)
    assert words.split() == "Red circle Then a blue star to the left of a heart".split()
    by = {w: (s, e) for w, s, e in utt.words}
    assert by["Then"][0] - by["circle"][1] > 0.1  # the full stop is a pause


@pytest.mark.parametrize("accent", ACCENTS + FOREIGN_ACCENTS)
def test_every_accent_speaks(accent):
    utt = synthesize("a green heart", voice=accent, variant="m2")
    assert [w for w, _, _ in utt.words] == ["a", "green", "heart"]
    _check_alignment(utt)


def test_rate_pitch_and_voice_change_the_audio():
    base = synthesize(TEXT, rate=175)
    fast = synthesize(TEXT, rate=300)
    assert fast.duration < 0.8 * base.duration
    low, high = synthesize(TEXT, pitch=10), synthesize(TEXT, pitch=90)

    def f0(utt):  # autocorrelation pitch of the vowel of "red"
        _, s, e = next(p for p in utt.phones if p[0] == "ɛ")
        seg = utt.audio[int(s * utt.sample_rate) : int(e * utt.sample_rate)].astype(np.float64)
        ac = np.correlate(seg, seg, "full")[len(seg) - 1 :]
        lo, hi = utt.sample_rate // 500, utt.sample_rate // 60
        return utt.sample_rate / (lo + int(np.argmax(ac[lo:hi])))

    assert f0(high) > 1.3 * f0(low)
    other = synthesize(TEXT, voice="en-gb-scotland", variant="f2")
    assert other.voice == "en-gb-scotland+f2"
    n = min(len(other.audio), len(base.audio))
    assert not np.allclose(other.audio[:n], base.audio[:n])


def test_a_foreign_accent_reads_english_with_its_own_rules():
    """German letter-to-sound rules give "three" no English "th": foreign-accented English."""
    english, german = synthesize("three red stars"), synthesize("three red stars", voice="de")
    assert [w for w, _, _ in german.words] == ["three", "red", "stars"]
    assert english.phones[0][0] == "θ" and "θ" not in {p for p, _, _ in german.phones}


def test_list_voices():
    voices = list_voices()
    assert set(voices["accents"]) == set(ACCENTS) and set(voices["foreign_accents"]) == set(FOREIGN_ACCENTS)
    assert {"f1", "f5", "m1", "m8", "klatt"} <= set(voices["variants"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(text=""), "empty"),
        (dict(text="hi", voice="fr"), "unknown accent"),
        (dict(text="hi", variant="nobody"), "unknown voice variant"),
        (dict(text="hi", rate=20), "rate"),
        (dict(text="hi", pitch=150), "pitch"),
    ],
)
def test_bad_input_raises_value_error(kwargs, message):
    with pytest.raises(SynthesisError, match=message):
        synthesize(**kwargs)
    assert issubclass(SynthesisError, ValueError)


def test_threads_share_the_engine_safely():
    texts = [f"a {c} {s}" for c in ("red", "blue", "green", "yellow") for s in ("star", "square", "heart")]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda t: synthesize(t, variant="f1"), texts))
    for text, utt in zip(texts, results):
        assert " ".join(w for w, _, _ in utt.words) == text
        _check_alignment(utt)


def test_a_fresh_process_gives_the_same_samples():
    code = (
        "import hashlib; from s2i.datasets.speech_synthesis import synthesize;"
        f"u = synthesize({TEXT!r}, voice='en-029', variant='m3', rate=150, pitch=40);"
        "print(hashlib.sha1(u.audio.tobytes()).hexdigest(), u.words)"
    )
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) > 40


@pytest.mark.parametrize("variant", [None, "m3", "f5", "klatt", "caleb"])  # f5: breath noise; caleb: Klatt noise
def test_same_arguments_same_samples_whatever_came_before(variant):
    first = synthesize(TEXT, voice="en-029", variant=variant)
    synthesize("something else entirely, said in another voice", voice="en-gb-x-rp", variant="f2", rate=300)
    again = synthesize(TEXT, voice="en-029", variant=variant)
    assert hashlib.sha1(first.audio.tobytes()).digest() == hashlib.sha1(again.audio.tobytes()).digest()
    assert first.words == again.words and first.phones == again.phones
