"""Offline text-to-speech with exact word and phone alignments (eSpeak NG through ctypes).

The built-in corpus needs many voices and, for unit-discovery analysis, the true time of every word
and phone. eSpeak NG (shipped as a shared library with its data by PyPI ``espeakng-loader``) gives
both: in synchronous mode it calls back with audio blocks and with WORD / PHONEME events that carry
their sample position, so the alignment is the synthesiser's own, not a forced alignment.

    utt = synthesize("a red circle above a blue star", voice="en-gb-x-rp", variant="f2", rate=160)
    utt.audio            # float32 numpy at utt.sample_rate (22050)
    utt.words            # [("a", 0.0, 0.06), ("red", 0.06, 0.31), ...]
    utt.phones           # [("ɐ", 0.0, 0.06), ("ɹ", 0.06, 0.11), ...]

eSpeak is one global C library that keeps signal state between calls: every call holds a
process-wide lock and runs on a freshly loaded copy of the library, so the same arguments always give
the same samples (also across threads, forked workers and processes).
"""
from __future__ import annotations

import _ctypes
import ctypes
import logging
import os
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

#: English accents of eSpeak NG 1.52 that read Latin-script English (en-Shaw is the Shavian script).
ACCENTS: tuple[str, ...] = (
    "en", "en-us", "en-us-nyc", "en-gb-x-rp", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029",
)
#: Voices of three other West Germanic languages. Given English text they read it with their own
#: letter-to-sound rules (switching to English only for the words their dictionaries mark as English):
#: foreign-accented English, far more varied than the English accents among themselves.
FOREIGN_ACCENTS: tuple[str, ...] = ("af", "de", "nl")
_ALL_ACCENTS = ACCENTS + FOREIGN_ACCENTS
RATE_RANGE = (80, 450)  # words per minute, eSpeak's limits
_STRESS_MARKS = "ˈˌ"
_PUNCTUATION = ".,;:!?\"'()"

# espeak_EVENT_TYPE (speak_lib.h)
_EVENT_LIST_TERMINATED, _EVENT_WORD, _EVENT_END, _EVENT_PHONEME = 0, 1, 5, 7
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_PHONEME_EVENTS_IPA = 0x0001 | 0x0002
_CHARS_UTF8 = 1
_POS_CHARACTER = 1
_PARAM_RATE, _PARAM_PITCH = 1, 3
_EE_OK = 0


class SynthesisError(ValueError):
    """The synthesiser cannot say this text with these settings (unknown voice, empty text, ...)."""


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    """``espeak_EVENT`` of speak_lib.h (API revision 12)."""

    _fields_ = [
        ("type", ctypes.c_int),  # espeak_EVENT_TYPE (a C enum: int)
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),  # characters from the start of the text, 1-based
        ("length", ctypes.c_int),  # word length in characters (WORD events)
        ("audio_position", ctypes.c_int),  # milliseconds into the output
        ("sample", ctypes.c_int),  # sample index into the output
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


_Callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


@dataclass
class Utterance:
    """One synthesised utterance: audio and its word and phone alignments (seconds)."""

    audio: np.ndarray  # float32 in [-1, 1], mono
    sample_rate: int
    words: list[tuple[str, float, float]] = field(default_factory=list)
    phones: list[tuple[str, float, float]] = field(default_factory=list)
    text: str = ""
    voice: str = ""  # the full eSpeak voice name, e.g. "en-us+f3"

    @property
    def duration(self) -> float:
        return len(self.audio) / self.sample_rate


class _Engine:
    """One freshly loaded copy of libespeak-ng: library handle, callback and buffers.

    eSpeak keeps signal state in C globals from one call to the next (pitch-flutter phase, echo
    buffer, ...), which no API call resets, so a long-lived instance would make each call's samples
    depend on the calls before it. Loading a fresh copy per utterance (~10 ms) and unloading it
    afterwards makes synthesis a pure function of its arguments.
    """

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError as exc:  # pragma: no cover - it is a requirement
            raise SynthesisError("speech synthesis needs the 'espeakng-loader' package: pip install espeakng-loader") from exc
        data_path = Path(espeakng_loader.get_data_path())
        lib = self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
            ctypes.POINTER(ctypes.c_uint), ctypes.c_void_p,
        ]
        lib.espeak_SetSynthCallback.argtypes = [_Callback]
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        self._callback = _Callback(self._on_audio)  # kept referenced: C holds a raw pointer to it
        self._blocks: list[np.ndarray] = []
        self._events: list[tuple[int, int, int, int, str]] = []
        # path = the folder that contains espeak-ng-data
        rate = lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, str(data_path.parent).encode(), _INITIALIZE_PHONEME_EVENTS_IPA
        )
        if rate <= 0:
            self.close()
            raise SynthesisError(f"eSpeak NG failed to initialise with data at {data_path}")
        lib.espeak_SetSynthCallback(self._callback)
        self.sample_rate = rate

    def close(self) -> None:
        """Terminate and unload this copy, so the next one starts from the library's initial state."""
        self.lib.espeak_Terminate()
        unload = getattr(_ctypes, "dlclose", None) or getattr(_ctypes, "FreeLibrary", None)
        if unload is not None:
            unload(self.lib._handle)

    def _on_audio(self, wav, n: int, events) -> int:
        if wav and n > 0:
            self._blocks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        i = 0
        while events[i].type != _EVENT_LIST_TERMINATED:
            e = events[i]
            name = ""
            if e.type == _EVENT_PHONEME:
                name = bytes(e.id.string).split(b"\0", 1)[0].decode("utf-8", "replace")
            self._events.append((e.type, e.text_position, e.length, e.sample, name))
            i += 1
        return 0

    def synthesize(self, text: str, voice_name: str, rate: int, pitch: int) -> tuple[np.ndarray, list]:
        """int16 samples and the event list ``(type, text_position, length, sample, phoneme)``."""
        if self.lib.espeak_SetVoiceByName(voice_name.encode()) != _EE_OK:
            raise SynthesisError(f"unknown eSpeak voice {voice_name!r}; see list_voices()")
        self.lib.espeak_SetParameter(_PARAM_RATE, rate, 0)
        self.lib.espeak_SetParameter(_PARAM_PITCH, pitch, 0)
        # noise (breath, Klatt voices) comes from eSpeak's PRNG, seeded from the clock at start-up,
        # and from the C library's rand()
        self.lib.espeak_ng_SetRandSeed(0)
        _seed_c_rand()
        data = text.encode("utf-8") + b"\0"
        status = self.lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if status != _EE_OK:
            raise SynthesisError(f"eSpeak NG could not synthesise {text!r} (error {status})")
        samples = np.concatenate(self._blocks) if self._blocks else np.zeros(0, np.int16)
        return samples, self._events


def _seed_c_rand() -> None:
    """srand(0): some Klatt voices draw noise from the C library's rand() (a process-wide side effect)."""
    try:
        ctypes.CDLL(None).srand(0)
    except (OSError, AttributeError, TypeError):  # pragma: no cover - no POSIX C library (Windows)
        pass


# eSpeak is one set of C globals per process: one utterance at a time.
_lock = threading.Lock()


def _new_lock_in_child() -> None:
    global _lock
    _lock = threading.Lock()  # a fork can copy the lock while another thread holds it


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock_in_child)


def _synthesize_fresh(text: str, voice_name: str, rate: int, pitch: int) -> tuple[np.ndarray, list, int]:
    with _lock:
        engine = _Engine()
        try:
            samples, events = engine.synthesize(text, voice_name, rate, pitch)
        finally:
            engine.close()
    return samples, events, engine.sample_rate


def _voice_name(voice: str, variant: str | None) -> str:
    if voice not in _ALL_ACCENTS:
        raise SynthesisError(f"unknown accent {voice!r}; choose one of {', '.join(_ALL_ACCENTS)}")
    if variant is None:
        return voice
    if variant not in _variants():
        raise SynthesisError(f"unknown voice variant {variant!r}; see list_voices()['variants']")
    return f"{voice}+{variant}"


def _alignments(
    text: str, events: list, n_samples: int, sample_rate: int
) -> tuple[list[tuple[str, float, float]], list[tuple[str, float, float]]]:
    """Words and phones from the event stream.

    A phone lasts from its PHONEME event to the next one (unnamed phoneme events are pauses and
    end the phone before them). A word owns the phones that start between its WORD event and the
    next word's, and spans them, so words and phones nest without overlap. eSpeak sometimes says two
    words as one (``"of a"``): it then sends one WORD event, and the entry's label is the text up to
    the next event, i.e. both words.
    """
    end_sample = n_samples
    for kind, _, _, sample, _ in events:
        if kind == _EVENT_END:
            end_sample = min(max(sample, 0), n_samples)
    phone_events = [(s, name) for kind, _, _, s, name in events if kind == _EVENT_PHONEME]
    phones: list[tuple[str, int, int]] = []
    for i, (start, name) in enumerate(phone_events):
        stop = min(phone_events[i + 1][0] if i + 1 < len(phone_events) else end_sample, n_samples)
        label = "".join(c for c in name if c not in _STRESS_MARKS).strip()
        if label and stop > start:
            phones.append((label, start, stop))

    word_events = [(s, pos) for kind, pos, _, s, _ in events if kind == _EVENT_WORD]
    words: list[tuple[str, float, float]] = []
    for i, (start, pos) in enumerate(word_events):
        next_start, next_pos = word_events[i + 1] if i + 1 < len(word_events) else (n_samples + 1, len(text) + 1)
        label = " ".join(w.strip(_PUNCTUATION) for w in text[pos - 1 : next_pos - 1].split()).strip()
        own = [p for p in phones if start <= p[1] < next_start]
        if not own or not label:
            continue  # a WORD event that produced no sound (e.g. for punctuation)
        words.append((label, own[0][1] / sample_rate, own[-1][2] / sample_rate))
    return words, [(p, a / sample_rate, b / sample_rate) for p, a, b in phones]


def synthesize(
    text: str, voice: str = "en-us", rate: int = 175, pitch: int = 50, variant: str | None = None
) -> Utterance:
    """Say ``text`` with an eSpeak NG accent (``voice``), optional voice ``variant`` (e.g. ``"f3"``,
    ``"m2"``, ``"klatt"``), speaking ``rate`` in words per minute (80-450) and base ``pitch`` (0-100).

    Returns audio at the engine's own rate (22,050 Hz) with word and phone alignments in seconds.
    The same arguments give the same samples, whatever was synthesised before, in any process.
    """
    if not isinstance(text, str) or not text.strip():
        raise SynthesisError("nothing to synthesise: the text is empty")
    if not RATE_RANGE[0] <= int(rate) <= RATE_RANGE[1]:
        raise SynthesisError(f"rate {rate} is outside eSpeak's {RATE_RANGE[0]}-{RATE_RANGE[1]} words per minute")
    if not 0 <= int(pitch) <= 100:
        raise SynthesisError(f"pitch {pitch} is outside 0-100")
    name = _voice_name(voice, variant)
    samples, events, sample_rate = _synthesize_fresh(text, name, int(rate), int(pitch))
    if len(samples) == 0:
        raise SynthesisError(f"eSpeak NG produced no audio for {text!r}")
    words, phones = _alignments(text, events, len(samples), sample_rate)
    audio = samples.astype(np.float32) / 32768.0
    return Utterance(audio=audio, sample_rate=sample_rate, words=words, phones=phones, text=text, voice=name)


def list_voices() -> dict[str, list[str]]:
    """The English accents, the foreign accents and the voice variants available (any accent combines
    with any variant)."""
    return {"accents": list(ACCENTS), "foreign_accents": list(FOREIGN_ACCENTS), "variants": list(_variants())}


@lru_cache(maxsize=1)
def _variants() -> tuple[str, ...]:
    import espeakng_loader

    folder = Path(espeakng_loader.get_data_path()) / "voices" / "!v"
    return tuple(sorted(p.name for p in folder.iterdir() if p.is_file() and " " not in p.name))
