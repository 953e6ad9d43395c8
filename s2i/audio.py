"""Audio front end: reading any audio into mono 16 kHz, and the speech features the encoders eat.

Reading (:func:`load_audio`, :func:`to_mono_16k`) turns a file, bytes, a file-like object or a
``(samples, sample_rate)`` pair into a mono float32 1-D tensor at 16 kHz, and turns every way audio
can be broken into an :class:`AudioError` whose message names the problem.

Features are ``nn.Module``s that run batched on CPU or GPU. They take waveforms ``(B, N)`` plus
``lengths (B,)`` in samples and return ``(feats (B, T, F), frame_lengths (B,))``, time-major and
right-padded with zeros. Padding never changes an utterance's valid frames:

* :class:`MFCC` — the seed's 39-d MFCC + delta + delta-delta, equal (up to float32 rounding) to
  ``python_speech_features`` with the seed's settings, its per-utterance CMVN and ``delta(N=2)``.
* :class:`LogMelFbank` — ResDAVEnet's 40-d log-mel filterbank (in dB), normalised per utterance.

Both share the seed's framing: 25 ms Hamming windows every 10 ms, the last frame zero-padded, so an
utterance of ``n`` samples has ``1 + ceil((n - 400) / 160)`` frames (1 if ``n <= 400``).
"""
from __future__ import annotations

import functools
import io
import logging
import math
import os
import warnings
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
import soundfile
import torch
import torchaudio
from torch import nn

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
MIN_SECONDS = 0.025  # one 25 ms feature frame
SILENCE_PEAK = 1e-5  # below one int16 step (3e-5): digital silence
DUST = 1e-10  # below one int32 step (4.7e-10): not a sample value, rounding residue

AudioSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO, tuple]


class AudioError(ValueError):
    """Audio that cannot be used; the message says what is wrong with it."""


class SilentAudioWarning(UserWarning):
    """The audio holds only (near-)digital silence: it loads, but carries no speech."""


class AudioTruncatedWarning(UserWarning):
    """Audio was cut: longer than ``max_seconds``, or a WAV file whose data ends early."""


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
def load_audio(source: AudioSource, *, max_seconds: float | None = 60.0, on_too_long: str = "truncate",
               target_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Read audio from anywhere into a mono float32 1-D tensor at ``target_rate`` (16 kHz).

    ``source`` is a path (str / Path), raw file bytes, a binary file-like object, or a pair of
    samples and sample rate as Gradio's Audio component gives it (``(sample_rate, samples)``;
    ``(samples, sample_rate)`` works too), with samples int16/int32/float, shape ``(N,)`` or
    ``(N, C)``. Files are decoded with soundfile (WAV, FLAC, OGG, MP3 and the other formats
    libsndfile reads); any sample rate is resampled, any channel count mixed down, integer samples
    scaled to [-1, 1].

    Audio longer than ``max_seconds`` (``None``: no limit) is cut to its first ``max_seconds`` with
    an :class:`AudioTruncatedWarning` when ``on_too_long="truncate"`` (the default; only that part
    is decoded), or refused with an :class:`AudioError` when ``on_too_long="error"``.

    Raises :class:`AudioError` for a missing or empty file, a file that is not audio, a truncated
    WAV header, no samples, NaN/inf samples, or audio shorter than 25 ms (one feature frame).
    All-silent audio loads with a :class:`SilentAudioWarning`. A WAV file whose data ends before
    its header says loads what is there with an :class:`AudioTruncatedWarning`.
    """
    if on_too_long not in ("truncate", "error"):
        raise ValueError(f"on_too_long must be 'truncate' or 'error', got {on_too_long!r}")
    if isinstance(source, tuple):
        samples, rate = _split_pair(source)
        keep = _frames_to_keep(_num_samples(samples), rate, max_seconds, on_too_long, "the audio")
        if keep is not None:
            samples = samples[:, :keep] if _channels_first(samples) else samples[:keep]
        return to_mono_16k(samples, rate, target_rate=target_rate)
    name, data = _open_source(source)
    samples, rate = _decode(name, data, max_seconds, on_too_long)  # (N, C)
    return to_mono_16k(samples.mean(axis=1), rate, target_rate=target_rate, name=name)


def to_mono_16k(samples: np.ndarray | torch.Tensor, sample_rate: int, *, target_rate: int = SAMPLE_RATE,
                name: str = "the audio") -> torch.Tensor:
    """Samples of any dtype, layout and rate → mono float32 1-D tensor at ``target_rate``.

    ``samples``: shape ``(N,)`` or ``(N, C)`` (``(C, N)`` is recognised too: the channel axis is
    the short one, at most 64 long). Integers are scaled to [-1, 1]; channels are averaged.
    Raises :class:`AudioError` for no samples, NaN/inf, or under 25 ms; warns
    :class:`SilentAudioWarning` for digital silence.
    """
    rate = _check_rate(sample_rate)
    x = _as_float_tensor(samples, name)
    if x.ndim == 2:
        x = x.mean(dim=0 if _channels_first(x) else 1)
    elif x.ndim != 1:
        raise AudioError(f"{name} has shape {tuple(x.shape)}; expected (samples,) or (samples, channels)")
    if x.numel() == 0:
        raise AudioError(f"{name} contains no samples")
    bad = (~torch.isfinite(x)).sum().item()
    if bad:
        raise AudioError(f"{name} contains NaN or infinite sample values ({bad} of {x.numel()} samples)")
    seconds = x.numel() / rate
    if seconds < MIN_SECONDS:
        raise AudioError(f"{name} is too short: {seconds * 1000:.1f} ms ({x.numel()} samples at {rate} Hz); "
                         f"at least {MIN_SECONDS * 1000:.0f} ms is needed for one feature frame")
    if x.abs().max().item() < SILENCE_PEAK:
        warnings.warn(f"{name} is silent (peak amplitude below {SILENCE_PEAK:g}); it carries no speech",
                      SilentAudioWarning, stacklevel=2)
    x = _resample(x, rate, int(target_rate))
    # Resampling leaves numerical dust (~1e-24) next to digital silence. Flush it to exact zeros:
    # float32 features would floor it like silence, float64 ones (the seed's) would not.
    return torch.where(x.abs() < DUST, 0.0, x).contiguous()


def trim_silence(wave: torch.Tensor, sample_rate: int = SAMPLE_RATE, top_db: float = 40.0,
                 margin: float = 0.1) -> torch.Tensor:
    """``wave`` (1-D) without its leading and trailing silence: frames (25 ms, 10 ms hop) more than
    ``top_db`` below the loudest one, keeping ``margin`` seconds of it on each side.

    A recording made with a microphone starts and ends with silence the corpus captions barely
    have; per-utterance feature normalisation would count it in. Silent or very short input is
    returned unchanged.
    """
    win, hop = int(0.025 * sample_rate), int(0.010 * sample_rate)
    if wave.dim() != 1 or wave.shape[0] < win:
        return wave
    energy = wave.unfold(0, win, hop).pow(2).mean(dim=1)
    peak = float(energy.max())
    if peak <= 0.0:
        return wave
    loud = torch.nonzero(energy >= peak * 10.0 ** (-top_db / 10.0)).flatten()
    keep = int(margin * sample_rate)
    start = max(0, int(loud[0]) * hop - keep)
    end = min(wave.shape[0], int(loud[-1]) * hop + win + keep)
    return wave[start:end]


def _split_pair(pair: tuple) -> tuple[np.ndarray | torch.Tensor, int]:
    """(samples, rate) or Gradio's (rate, samples) → (samples, rate)."""
    if len(pair) != 2:
        raise AudioError(f"an audio tuple must be (samples, sample_rate); got {len(pair)} items")
    a, b = pair
    if _is_rate(b) and not _is_rate(a):
        return a, b
    if _is_rate(a) and not _is_rate(b):
        return b, a
    raise AudioError("an audio tuple must hold a sample array and an integer sample rate, "
                     f"got ({type(a).__name__}, {type(b).__name__})")


def _is_rate(v) -> bool:
    if isinstance(v, (np.ndarray, torch.Tensor)):
        return v.ndim == 0
    return isinstance(v, (int, float, np.number)) and not isinstance(v, bool)


def _check_rate(rate) -> int:
    try:
        value = float(rate)
    except (TypeError, ValueError):
        raise AudioError(f"sample rate must be a number, got {rate!r}") from None
    if not math.isfinite(value) or value <= 0 or value != round(value):
        raise AudioError(f"sample rate must be a positive whole number of Hz, got {rate!r}")
    return int(value)


def _channels_first(samples) -> bool:
    """A 2-D array is (C, N) when its first axis is the short one and no longer than 64."""
    shape = tuple(getattr(samples, "shape", ()))
    return len(shape) == 2 and 1 <= shape[0] < shape[1] and shape[0] <= 64


def _num_samples(samples) -> int:
    shape = tuple(getattr(samples, "shape", ()))
    return 0 if not shape else shape[1] if _channels_first(samples) else shape[0]


def _as_float_tensor(samples, name: str) -> torch.Tensor:
    """Any numeric array → float32 tensor on the CPU, integers scaled to [-1, 1]."""
    if isinstance(samples, torch.Tensor):
        x = samples.detach().cpu()
        if x.dtype == torch.uint8:
            return (x.float() - 128.0) / 128.0
        if x.dtype in (torch.int8, torch.int16, torch.int32, torch.int64):
            return x.float() / float(-torch.iinfo(x.dtype).min)
        if not x.is_floating_point():
            raise AudioError(f"{name} has samples of type {x.dtype}; expected integer or float samples")
        return x.float()
    try:
        a = np.asarray(samples)
    except (TypeError, ValueError) as e:
        raise AudioError(f"{name} is not an array of samples ({e})") from None
    if a.dtype == np.uint8:
        return torch.from_numpy((a.astype(np.float32) - 128.0) / 128.0)
    if np.issubdtype(a.dtype, np.signedinteger):
        return torch.from_numpy((a / float(-np.iinfo(a.dtype).min)).astype(np.float32))
    if not np.issubdtype(a.dtype, np.floating):
        raise AudioError(f"{name} has samples of type {a.dtype}; expected integer or float samples")
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def _resample(x: torch.Tensor, rate: int, target: int) -> torch.Tensor:
    if rate == target:
        return x
    if max(rate, target) // math.gcd(rate, target) > 1000:
        # A rate like 22051 Hz shares no factor with 16 kHz: the exact polyphase kernel would need
        # gigabytes. Resample as from the nearest rate that does (22050 Hz: a 0.005% speed change).
        near = next((c for d in range(rate) for c in (rate - d, rate + d)
                    if c > 0 and max(c, target) // math.gcd(c, target) <= 1000), rate)
        logger.debug("resampling %d Hz audio as if it were %d Hz", rate, near)
        rate = near
        if rate == target:
            return x
    return torchaudio.functional.resample(x, rate, target)


def _frames_to_keep(n_frames: int, rate, max_seconds: float | None, on_too_long: str, name: str) -> int | None:
    """None if the audio fits in ``max_seconds``, else how many frames to keep (or raise)."""
    if max_seconds is None or n_frames <= 0:
        return None
    rate = _check_rate(rate)
    seconds = n_frames / rate
    if seconds <= max_seconds:
        return None
    if on_too_long == "error":
        raise AudioError(f"{name} is too long: {seconds:.1f} s; the limit is {max_seconds:g} s")
    warnings.warn(f"{name} is {seconds:.1f} s long; using its first {max_seconds:g} s",
                  AudioTruncatedWarning, stacklevel=3)
    return int(round(max_seconds * rate))


def _open_source(source) -> tuple[str, bytes | str]:
    """→ (a name for messages, a path or the file's bytes), with missing/empty sources refused."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise AudioError(f"audio file not found: {path}")
        if path.is_dir():
            raise AudioError(f"expected an audio file, got a folder: {path}")
        if path.stat().st_size == 0:
            raise AudioError(f"audio file is empty (0 bytes): {path}")
        return f"audio file {path}", str(path)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        name = "the audio data"
    elif hasattr(source, "read"):
        data = source.read()
        if isinstance(data, str):
            raise AudioError("the audio file object is open in text mode; open it with 'rb'")
        name = f"audio file {getattr(source, 'name', 'object')}"
    else:
        raise AudioError(f"cannot read audio from a {type(source).__name__}: pass a path, bytes, "
                         "a binary file object, or (samples, sample_rate)")
    if len(data) == 0:
        raise AudioError(f"{name} is empty (0 bytes)")
    return name, data


def _decode(name: str, data: bytes | str, max_seconds: float | None, on_too_long: str) -> tuple[np.ndarray, int]:
    """Decode a file (path or bytes) with soundfile, reading no more than ``max_seconds``."""
    head = _head(data, 64)
    try:
        with soundfile.SoundFile(data if isinstance(data, str) else io.BytesIO(data)) as f:
            rate, n_frames = f.samplerate, f.frames
            keep = _frames_to_keep(n_frames, rate, max_seconds, on_too_long, name)
            samples = f.read(-1 if keep is None else keep, dtype="float32", always_2d=True)
    except soundfile.SoundFileError as e:
        if head[:4] in (b"RIFF", b"RIFX", b"RF64") and head[8:12] in (b"WAVE", b""):
            raise AudioError(f"{name} is a truncated or corrupt WAV file: its header is incomplete or damaged "
                             f"({_size(data)} bytes)") from None
        reason = (getattr(e, "error_string", "") or str(e)).strip().rstrip(".") or "unknown format"
        if "does not exist" in reason:  # libsndfile's words when a decoder finds no stream in an existing file
            reason = "no audio stream found: truncated, or not audio"
        raise AudioError(f"{name} is not a readable audio file ({reason}; readable formats: WAV, FLAC, "
                         "OGG, MP3, AIFF and the others libsndfile knows)") from None
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        _warn_if_wav_data_cut(name, data)
    return samples, rate


def _head(data: bytes | str, n: int) -> bytes:
    if isinstance(data, str):
        with open(data, "rb") as f:
            return f.read(n)
    return data[:n]


def _size(data: bytes | str) -> int:
    return os.path.getsize(data) if isinstance(data, str) else len(data)


def _warn_if_wav_data_cut(name: str, data: bytes | str) -> None:
    """Warn when a WAV's data chunk is shorter than its header declares (a cut download/recording).

    Streaming writers put 0 or 0xFFFFFFFF as the size; those are not warned about.
    """
    head = _head(data, 4096)
    pos = 12
    while pos + 8 <= len(head):
        chunk, size = head[pos:pos + 4], int.from_bytes(head[pos + 4:pos + 8], "little")
        if chunk == b"data":
            present = _size(data) - (pos + 8)
            if 0 < size < 0xFFFFFFFF and present < size:
                warnings.warn(f"{name} is a truncated WAV file: its header declares {size} bytes of audio, "
                              f"the file holds {present}; using what is there", AudioTruncatedWarning, stacklevel=4)
            return
        pos += 8 + size + (size & 1)


# ---------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------
_EPS = float(np.finfo(np.float64).eps)  # python_speech_features' floor for zero energies


def hz_to_mel(hz):
    """HTK mel scale (python_speech_features): 2595 · log10(1 + f / 700)."""
    return 2595.0 * np.log10(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def mel_to_hz(mel):
    return 700.0 * (10.0 ** (np.asarray(mel, dtype=np.float64) / 2595.0) - 1.0)


def snapped_mel_filterbank(n_filters: int = 40, n_fft: int = 512, sample_rate: int = SAMPLE_RATE,
                           low_hz: float = 0.0, high_hz: float | None = None) -> torch.Tensor:
    """Triangular mel filters with edges snapped to FFT bins (python_speech_features' construction).

    Returns ``(n_fft // 2 + 1, n_filters)``: power spectrum ``@`` filterbank = filterbank energies.
    """
    high_hz = sample_rate / 2 if high_hz is None else high_hz
    edges = np.floor((n_fft + 1) * mel_to_hz(np.linspace(hz_to_mel(low_hz), hz_to_mel(high_hz), n_filters + 2))
                     / sample_rate)
    left, centre, right = edges[:-2], edges[1:-1], edges[2:]
    k = np.arange(n_fft // 2 + 1, dtype=np.float64)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        rising = np.where((k >= left) & (k < centre), (k - left) / (centre - left), 0.0)
        falling = np.where((k >= centre) & (k < right), (right - k) / (right - centre), 0.0)
    return torch.from_numpy(rising + falling).float()


def dct_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """Orthonormal DCT-II as an ``(n_in, n_out)`` matrix (first ``n_out`` coefficients)."""
    n = np.arange(n_in)[:, None]
    k = np.arange(n_out)[None, :]
    m = np.cos(np.pi * k * (2 * n + 1) / (2 * n_in)) * np.sqrt(2.0 / n_in)
    m[:, 0] /= np.sqrt(2.0)
    return torch.from_numpy(m).float()


def frame_mask(frame_lengths: torch.Tensor, n_frames: int) -> torch.Tensor:
    """``(B, T)`` bool, True on valid frames."""
    return torch.arange(n_frames, device=frame_lengths.device)[None, :] < frame_lengths[:, None]


def normalize_per_utterance(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Mean/variance normalisation of ``(B, T, F)`` over each utterance's valid frames only; padding → 0."""
    weights = mask.to(x.dtype)[:, None, :]  # (B, 1, T): masked sums over time are batched matmuls
    count = weights.sum(dim=-1, keepdim=True).clamp_min(1.0)
    centred = x - torch.bmm(weights, x) / count
    std = (torch.bmm(weights, centred.square()) / count).sqrt_().clamp_min_(eps)
    return zero_padding(centred.div_(std), mask)


def zero_padding(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Set the frames of a contiguous ``(B, T, F)`` where ``mask (B, T)`` is False to 0, in place."""
    padding = (~mask).flatten().nonzero().squeeze(1)
    x.view(-1, x.shape[-1]).index_fill_(0, padding, 0.0)
    return x


def deltas(x: torch.Tensor, frame_lengths: torch.Tensor, n: int = 2) -> torch.Tensor:
    """Regression deltas over ±n frames (python_speech_features' ``delta``), batched.

    Each utterance is edge-replicated at its own last valid frame, so padding has no effect (the
    result's padded frames hold garbage).
    """
    B, T, F = x.shape
    if T == 0:
        return x.clone()
    # one row gather builds every utterance's edge-replicated copy: its frame t is frame clamp(t − n, 0, last)
    t = torch.arange(-n, T + n, device=x.device)[None, :]
    last = (frame_lengths.to(x.device) - 1).clamp(0, T - 1)[:, None]
    rows = torch.minimum(t.clamp_min(0), last) + T * torch.arange(B, device=x.device)[:, None]
    padded = x.reshape(B * T, F).index_select(0, rows.flatten()).view(B, T + 2 * n, F)
    out = padded[:, n + 1:n + 1 + T] - padded[:, n - 1:n - 1 + T]
    for k in range(2, n + 1):
        out.add_(padded[:, n + k:n + k + T] - padded[:, n - k:n - k + T], alpha=k)
    return out.div_(2 * sum(k * k for k in range(1, n + 1)))


class _FramedSpectrum(nn.Module):
    """Shared front of both features: pre-emphasis, 25 ms Hamming frames every 10 ms, |FFT|² / NFFT."""

    sample_rate = SAMPLE_RATE
    win_length = 400
    hop_length = 160
    n_fft = 512
    frame_shift = 0.01  # seconds

    def __init__(self, preemphasis: float = 0.97):
        super().__init__()
        self.preemphasis = preemphasis
        # np.hamming / scipy's default: the symmetric window
        self.register_buffer("window", torch.hamming_window(self.win_length, periodic=False, dtype=torch.float64).float(),
                             persistent=False)

    def num_frames(self, n_samples):
        """Frames for ``n_samples`` samples (int or tensor): 1 + ceil((n − 400) / 160), 1 if n ≤ 400, 0 if n = 0."""
        if isinstance(n_samples, torch.Tensor):
            extra = (n_samples - self.win_length).clamp_min(0)
            return torch.where(n_samples > 0, 1 + (extra + self.hop_length - 1) // self.hop_length, 0)
        n = int(n_samples)
        return 0 if n <= 0 else 1 + (max(n - self.win_length, 0) + self.hop_length - 1) // self.hop_length

    def _batch(self, waveform, lengths) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.as_tensor(waveform)
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2:
            raise ValueError(f"waveforms must be (N,) or (B, N), got shape {tuple(x.shape)}")
        x = x.to(self.window.device, self.window.dtype)  # float32 unless the module was cast
        if lengths is None:
            lengths = torch.full((x.shape[0],), x.shape[1], dtype=torch.long, device=x.device)
        lengths = torch.as_tensor(lengths, device=x.device).long().reshape(-1)
        if lengths.shape[0] != x.shape[0] or bool((lengths > x.shape[1]).any()) or bool((lengths < 0).any()):
            raise ValueError(f"lengths must be (B,) = ({x.shape[0]},) with values in 0..{x.shape[1]}, "
                             f"got {lengths.tolist()}")
        return x, lengths

    def power_spectrum(self, waveform, lengths=None) -> tuple[torch.Tensor, torch.Tensor]:
        """→ ``(power (B, T, n_fft/2 + 1), frame_lengths (B,))``; frames past an utterance's end are 0."""
        x, lengths = self._batch(waveform, lengths)
        frame_lengths = self.num_frames(lengths)
        n_frames = int(frame_lengths.max()) if x.shape[0] else 0
        y = torch.cat([x[:, :1], x[:, 1:] - self.preemphasis * x[:, :-1]], dim=1)
        padded = (max(n_frames, 1) - 1) * self.hop_length + self.win_length
        y = nn.functional.pad(y, (0, max(0, padded - y.shape[1])))[:, :padded]
        # zero everything after each utterance's end, as if it had been framed on its own
        y = y * (torch.arange(padded, device=y.device)[None, :] < lengths[:, None])
        frames = y.unfold(1, self.win_length, self.hop_length)[:, :n_frames] * self.window
        spec = torch.fft.rfft(frames, n=self.n_fft)
        return torch.view_as_real(spec).square().sum(-1) / self.n_fft, frame_lengths


class MFCC(_FramedSpectrum):
    """The seed's 39-d features: 13 MFCCs (c0 = log frame energy) + Δ + ΔΔ, CMVN before the deltas.

    Matches ``python_speech_features.mfcc(winlen=0.025, winstep=0.01, numcep=13, nfilt=40, nfft=512,
    preemph=0.97, ceplifter=0, appendEnergy=True, winfunc=np.hamming)`` → per-utterance mean/variance
    normalisation → ``delta(N=2)`` twice (seed-spec §4.1), batched and padding-invariant. Like
    python_speech_features, only energies that are exactly zero (all-zero frames) are floored at
    float64 eps before the log; tiny positive ones keep their value.

    Only valid frames are computed: the utterances' frames are packed end to end, and their spectra
    computed ``block_frames`` at a time on a CPU (so that frames, FFT and power stay in cache), all at
    once on a GPU.
    """

    block_frames = 128

    def __init__(self, n_mfcc: int = 13, n_filters: int = 40, normalize: bool = True, delta_window: int = 2,
                 preemphasis: float = 0.97):
        super().__init__(preemphasis)
        self.n_mfcc, self.normalize, self.delta_window = n_mfcc, normalize, delta_window
        self.dim = 3 * n_mfcc
        fb = snapped_mel_filterbank(n_filters, self.n_fft, self.sample_rate)
        self.register_buffer("filterbank", fb, persistent=False)
        self.register_buffer("dct", dct_matrix(n_filters, n_mfcc), persistent=False)
        # The FFT's (re, im) pairs, squared, times `bands` = [frame energy, mel energies] of |X|² / n_fft:
        # a column of ones then the filterbank, each row doubled (re² and im² weigh alike).
        bands = torch.cat([torch.ones(fb.shape[0], 1), fb], dim=1).repeat_interleave(2, dim=0) / self.n_fft
        self.register_buffer("bands", bands, persistent=False)
        # log [energy, mel energies] @ `cepstra` = [log energy, c1 .. c(n_mfcc-1)]: the DCT, c0 replaced
        cepstra = torch.zeros(n_filters + 1, n_mfcc)
        cepstra[0, 0] = 1.0
        cepstra[1:, 1:] = self.dct[:, 1:]
        self.register_buffer("cepstra", cepstra, persistent=False)

    def forward(self, waveform, lengths=None) -> tuple[torch.Tensor, torch.Tensor]:
        x, lengths = self._batch(waveform, lengths)
        frame_lengths = self.num_frames(lengths)
        n_frames = int(frame_lengths.max()) if x.shape[0] else 0
        ceps = self._cepstra(x, lengths, frame_lengths, n_frames)
        mask = frame_mask(frame_lengths, n_frames)
        if self.normalize:
            ceps = normalize_per_utterance(ceps, mask)
        d1 = deltas(ceps, frame_lengths, self.delta_window)
        d2 = deltas(d1, frame_lengths, self.delta_window)
        return zero_padding(torch.cat([ceps, d1, d2], dim=-1), mask), frame_lengths

    def _cepstra(self, x: torch.Tensor, lengths: torch.Tensor, frame_lengths: torch.Tensor,
                 n_frames: int) -> torch.Tensor:
        """``(B, T, n_mfcc)``: log frame energy and c1 .. c(n_mfcc − 1) of each valid frame (padding: junk)."""
        frames, starts = self._packed_frames(x, lengths, frame_lengths)
        energies = x.new_empty(frames.shape[0], self.bands.shape[1])
        step = self.block_frames if x.device.type == "cpu" else max(frames.shape[0], 1)
        windowed = x.new_zeros(min(step, frames.shape[0]), self.n_fft)  # columns 400 .. n_fft stay zero
        for t in range(0, frames.shape[0], step):
            block = frames[t:t + step]
            buf = windowed[:block.shape[0]]
            torch.mul(block, self.window, out=buf[:, :self.win_length])
            power_pairs = torch.view_as_real(torch.fft.rfft(buf)).square_().flatten(-2)
            torch.matmul(power_pairs, self.bands, out=energies[t:t + block.shape[0]])
        # python_speech_features' floor: only exact zeros become eps (numpy.where(e == 0, eps, e))
        cepstra = energies.masked_fill_(energies == 0, _EPS).log_() @ self.cepstra
        rows = (starts[:, None] + torch.arange(n_frames, device=x.device)).clamp_max(max(cepstra.shape[0] - 1, 0))
        return cepstra.index_select(0, rows.flatten()).view(x.shape[0], n_frames, self.n_mfcc)

    def _packed_frames(self, x: torch.Tensor, lengths: torch.Tensor,
                       frame_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every utterance's frames end to end: ``(frames (F, 400) view, first frame of each (B,))``.

        The pre-emphasised utterances are laid one after another in a single signal, utterance i
        ``(n_i + 2) · hop`` samples long (its ``n_i`` frames cover ``(n_i + 1.5) · hop``, zero-padded), so
        that one strided view frames them all. Between two utterances sit two junk frames (computed, never read).
        """
        hop = self.hop_length
        counts = frame_lengths.tolist()
        starts = np.concatenate([[0], np.cumsum([n + 2 if n else 0 for n in counts])])
        signal = x.new_empty(int(starts[-1]) * hop)
        for i, (length, n) in enumerate(zip(lengths.tolist(), counts)):
            if n == 0:
                continue
            y = signal[int(starts[i]) * hop:int(starts[i + 1]) * hop]
            y[:1] = x[i, :1]
            torch.sub(x[i, 1:length], x[i, :length - 1], alpha=self.preemphasis, out=y[1:length])
            y[length:] = 0.0
        if signal.shape[0] < self.win_length:  # no utterance has a frame
            return signal.new_zeros(0, self.win_length), torch.as_tensor(starts[:-1], device=x.device)
        return signal.unfold(0, self.win_length, hop), torch.as_tensor(starts[:-1], device=x.device)


class LogMelFbank(_FramedSpectrum):
    """ResDAVEnet's log-mel filterbank: 40 mel bands (librosa/Slaney filters, 20 Hz–8 kHz) in dB.

    Power is floored at 1e-10 and, like librosa's ``power_to_db(top_db=80)`` used by ResDAVEnet,
    at ``top_db`` below the utterance's loudest band (``None``: no such floor). Per-utterance
    mean/variance normalisation over valid frames when ``normalize`` (the default); without it the
    output is an absolute dB spectrogram, as used for plots.
    """

    def __init__(self, n_mels: int = 40, normalize: bool = True, f_min: float = 20.0, f_max: float = 8000.0,
                 top_db: float | None = 80.0, preemphasis: float = 0.97):
        super().__init__(preemphasis)
        self.n_mels, self.normalize, self.top_db = n_mels, normalize, top_db
        self.dim = n_mels
        fb = torchaudio.functional.melscale_fbanks(self.n_fft // 2 + 1, f_min, f_max, n_mels, self.sample_rate,
                                                   norm="slaney", mel_scale="slaney")
        self.register_buffer("filterbank", fb.float(), persistent=False)

    def forward(self, waveform, lengths=None) -> tuple[torch.Tensor, torch.Tensor]:
        power, frame_lengths = self.power_spectrum(waveform, lengths)
        mask = frame_mask(frame_lengths, power.shape[1])
        db = 10.0 * (power @ self.filterbank).clamp_min(1e-10).log10()
        if self.top_db is not None and db.shape[1] > 0:
            peak = db.masked_fill(~mask[..., None], float("-inf")).amax(dim=(1, 2), keepdim=True)
            db = torch.maximum(db, peak - self.top_db)
        if self.normalize:
            db = normalize_per_utterance(db, mask)
        return db * mask[..., None], frame_lengths


FEATURES = {"mfcc": MFCC, "fbank": LogMelFbank}
#: bumped when a feature type's values change, so that feature caches made by earlier code are rebuilt,
#: not read (mfcc 2: zero energies floored at float64's eps, as python_speech_features does)
FEATURE_VERSIONS: dict[str, int] = {"mfcc": 2, "fbank": 1}


def feature_extractor(name: str, **options) -> nn.Module:
    """``"mfcc"`` (the seed's 39-d) or ``"fbank"`` (ResDAVEnet's 40-d log-mel), options passed on."""
    if name not in FEATURES:
        raise ValueError(f"unknown speech features {name!r}; choose one of {sorted(FEATURES)}")
    return FEATURES[name](**options)


@functools.lru_cache(maxsize=1)
def _display_fbank() -> LogMelFbank:
    return LogMelFbank(normalize=False)


def spectrogram(waveform: np.ndarray | torch.Tensor, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Log-mel spectrogram in dB for display, ``(T, 40)`` at 10 ms per row, of one waveform."""
    x = torch.as_tensor(waveform)
    if sample_rate != SAMPLE_RATE or x.ndim != 1:
        x = to_mono_16k(waveform, sample_rate)
    with torch.no_grad():
        feats, _ = _display_fbank()(x.float())
    return feats[0].numpy()
