"""Augmentations: of waveforms, for training and as test conditions for robustness evaluation, and
of cached feature batches, for training at no decoding cost.

Plain functions on a 1-D float waveform (a torch tensor; numpy arrays are accepted):

    add_noise(wave, snr_db=10)            white (or pink) noise, or another signal (babble), at an exact SNR
    speed(wave, 1.1)                      speed perturbation by resampling (tempo and pitch change together)
    telephone(wave, 16000)                300-3400 Hz band, 8 kHz, mu-law codec: a phone line
    reverb(wave, rt60=0.5)                convolution with a synthetic exponentially decaying room response

and :class:`Augment`, a picklable callable composed from a spec string, used by
``PairedDataset(augment=...)``, ``train augment=...`` and ``evaluate --augment``::

    Augment("noise:10")                   white noise at 10 dB SNR, on every utterance (a test condition)
    Augment("noise:5..20@0.5,speed@0.5")  SNR drawn in [5, 20] dB half the time; speed in [0.9, 1.1] half the time
    Augment("train")                      the preset training recipe (PRESETS["train"])

Item syntax: ``name[:value | :low..high][@probability]``; names are ``noise``, ``pink``, ``speed``,
``telephone``, ``reverb``; without a value the range in :data:`DEFAULT_RANGES` is used; without a
probability the item is applied to every utterance. Random draws come from the ``generator`` given
to the call, else from torch's global RNG (seeded per DataLoader worker by torch).

:class:`FeatureAugment` (``train feature_augment=...``) perturbs a padded ``(B, T, F)`` feature
batch per utterance with the same spec syntax: ``vtlp`` (vocal-tract length), ``tempo``, and
SpecAugment's ``fmask`` / ``tmask``; it reads features from the cache, so it costs nothing like
decoding and re-featurising every waveform. :class:`ImageAugment` (``train image_augment=affine``)
jitters image batches (rotation, zoom, shift) the same way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torchaudio.functional as AF

SAMPLE_RATE = 16000
TELEPHONE_BAND = (300.0, 3400.0)
DEFAULT_RANGES: dict[str, tuple[float, float]] = {
    "noise": (5.0, 20.0),  # SNR in dB
    "pink": (5.0, 20.0),
    "speed": (0.9, 1.1),  # speed factor
    "reverb": (0.2, 0.8),  # RT60 in seconds
    "telephone": (0.0, 0.0),  # no parameter
}
PRESETS = {"train": "noise:5..20@0.5,speed:0.9..1.1@0.5,reverb:0.2..0.8@0.3,telephone@0.2"}


class AugmentError(ValueError):
    """A bad augmentation spec or argument; the message says what is accepted."""


def _as_wave(wave) -> torch.Tensor:
    wave = torch.as_tensor(wave)
    if wave.ndim == 0 or wave.shape[-1] == 0:
        raise AugmentError("cannot augment an empty waveform")
    return wave.float()


def _power(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean(dim=-1, keepdim=True)


def _uniform(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator))


def add_noise(wave, snr_db: float, generator: torch.Generator | None = None, colour: str = "white",
              noise=None) -> torch.Tensor:
    """``wave`` plus noise scaled so that 10·log10(P_wave / P_noise) = ``snr_db`` exactly (powers
    averaged over the whole waveform). ``colour`` is ``"white"`` or ``"pink"`` (1/f); ``noise`` gives
    the noise signal instead (e.g. other utterances for babble), tiled or cut to length."""
    wave = _as_wave(wave)
    n = wave.shape[-1]
    if noise is not None:
        noise = _as_wave(noise)
        noise = noise.repeat(*([1] * (noise.ndim - 1)), math.ceil(n / noise.shape[-1]))[..., :n]
    elif colour == "white":
        noise = torch.randn(wave.shape, generator=generator)
    elif colour == "pink":
        spectrum = torch.fft.rfft(torch.randn(wave.shape, generator=generator))
        freqs = torch.arange(spectrum.shape[-1], dtype=torch.float32)
        spectrum = spectrum / freqs.clamp(min=1).sqrt()
        spectrum[..., 0] = 0
        noise = torch.fft.irfft(spectrum, n=n)
    else:
        raise AugmentError(f"unknown noise colour {colour!r}; use 'white' or 'pink' (or pass noise=)")
    noise_power = _power(noise)
    if bool((noise_power == 0).any()):
        raise AugmentError("the noise signal is silent")
    scale = torch.sqrt(_power(wave) / (noise_power * 10 ** (snr_db / 10)))
    return wave + scale * noise


def speed(wave, factor: float) -> torch.Tensor:
    """Play ``factor`` times faster (length / factor, pitch × factor), by resampling as in Kaldi's
    speed perturbation. The factor is rounded to 0.01 to keep the resampling kernel small."""
    if not 0.5 <= factor <= 2.0:
        raise AugmentError(f"speed factor {factor} is outside 0.5-2.0")
    wave = _as_wave(wave)
    percent = int(round(factor * 100))
    if percent == 100:
        return wave.clone()
    return AF.resample(wave, orig_freq=percent, new_freq=100)


def telephone(wave, sample_rate: int = SAMPLE_RATE, codec: bool = True) -> torch.Tensor:
    """A phone line: resample to 8 kHz, 8-bit mu-law codec (G.711), keep 300-3400 Hz, back to
    ``sample_rate``. Same length as the input."""
    wave = _as_wave(wave)
    n = wave.shape[-1]
    narrow = AF.resample(wave, sample_rate, 8000) if sample_rate != 8000 else wave
    if codec:
        peak = narrow.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8)
        narrow = AF.mu_law_decoding(AF.mu_law_encoding(narrow / peak, 256), 256) * peak
    spectrum = torch.fft.rfft(narrow)
    freqs = torch.fft.rfftfreq(narrow.shape[-1], d=1 / 8000)
    spectrum = spectrum * ((freqs >= TELEPHONE_BAND[0]) & (freqs <= TELEPHONE_BAND[1]))
    narrow = torch.fft.irfft(spectrum, n=narrow.shape[-1])
    out = AF.resample(narrow, 8000, sample_rate) if sample_rate != 8000 else narrow
    if out.shape[-1] >= n:
        return out[..., :n]
    return torch.nn.functional.pad(out, (0, n - out.shape[-1]))


def reverb(wave, rt60: float = 0.5, sample_rate: int = SAMPLE_RATE, generator: torch.Generator | None = None,
           ) -> torch.Tensor:
    """Convolve with a synthetic room response: a direct path then Gaussian noise decaying by 60 dB
    in ``rt60`` seconds. Same length and RMS as the input."""
    if not 0.01 <= rt60 <= 5.0:
        raise AugmentError(f"RT60 {rt60} s is outside 0.01-5 s")
    wave = _as_wave(wave)
    length = max(int(min(1.2 * rt60, 2.0) * sample_rate), 2)
    t = torch.arange(length, dtype=torch.float32) / sample_rate
    response = torch.randn(length, generator=generator) * torch.exp(-math.log(1000.0) * t / rt60) * 0.3
    response[0] = 1.0
    out = AF.fftconvolve(wave, response.expand(*wave.shape[:-1], length))[..., : wave.shape[-1]]
    return out * torch.sqrt(_power(wave) / _power(out).clamp(min=1e-12))


@dataclass(frozen=True)
class _Step:
    name: str
    low: float
    high: float
    probability: float


def _parse_item(item: str, default_probability: float, ranges: dict[str, tuple[float, float]] = DEFAULT_RANGES,
                presets: dict[str, str] = PRESETS) -> _Step:
    text, _, prob_text = item.partition("@")
    name, _, value = text.partition(":")
    name = name.strip().lower()
    if name not in ranges:
        raise AugmentError(f"unknown augmentation {name!r} in {item!r}; choose from {', '.join(ranges)} "
                           f"or a preset ({', '.join(presets)})")
    try:
        probability = float(prob_text) if prob_text else default_probability
        if not value:
            low, high = ranges[name]
        elif ".." in value:
            low, high = (float(v) for v in value.split("..", 1))
        else:
            low = high = float(value)
    except ValueError:
        raise AugmentError(f"cannot read {item!r}: write name[:value | :low..high][@probability], "
                           "e.g. noise:10 or speed:0.9..1.1@0.5") from None
    if not 0.0 <= probability <= 1.0:
        raise AugmentError(f"probability {probability} in {item!r} is outside 0-1")
    if low > high:
        raise AugmentError(f"range {value!r} in {item!r} goes downwards")
    if name == "telephone" and value:
        raise AugmentError("telephone takes no value")
    return _Step(name, low, high, probability)


#: a step's value where it is not applied: factors 1, everything else (widths, angles, shifts) 0
_NEUTRAL = {"vtlp": 1.0, "tempo": 1.0, "scale": 1.0}


def _draw(step: _Step, batch: int, draws: int = 1) -> torch.Tensor:
    """``(batch, draws)`` values of ``step`` from torch's global RNG, its neutral value where the
    step's probability skips an item (one skip decision per item, shared by its draws)."""
    value = step.low + (step.high - step.low) * torch.rand(batch, draws)
    apply = (torch.rand(batch) < step.probability)[:, None]
    return torch.where(apply, value, torch.full_like(value, _NEUTRAL.get(step.name, 0.0)))


def _parse_spec(spec: str, probability: float, ranges: dict[str, tuple[float, float]], presets: dict[str, str],
                example: str) -> tuple[str, list[_Step]]:
    spec = presets.get(spec.strip(), spec)
    items = [item for item in spec.replace(" ", "").split(",") if item]
    if not items:
        raise AugmentError(f"empty augmentation spec; e.g. {example}")
    return spec, [_parse_item(item, probability, ranges, presets) for item in items]


class Augment:
    """A chain of waveform augmentations from a spec string (see the module docstring).

    ``probability`` is the chance of each item that gives none with ``@``. Call it on a 1-D
    waveform (at ``sample_rate``) with an optional ``torch.Generator`` for reproducible draws.
    """

    def __init__(self, spec: str, probability: float = 1.0, sample_rate: int = SAMPLE_RATE) -> None:
        self.spec, self.steps = _parse_spec(spec, probability, DEFAULT_RANGES, PRESETS, "'noise:10' or 'noise,speed@0.5'")
        self.sample_rate = sample_rate

    def __call__(self, wave, generator: torch.Generator | None = None) -> torch.Tensor:
        out = _as_wave(wave)
        for step in self.steps:
            if step.probability < 1.0 and _uniform(generator) >= step.probability:
                continue
            value = step.low + (step.high - step.low) * _uniform(generator) if step.high > step.low else step.low
            if step.name in ("noise", "pink"):
                out = add_noise(out, value, generator, colour="white" if step.name == "noise" else "pink")
            elif step.name == "speed":
                out = speed(out, value)
            elif step.name == "telephone":
                out = telephone(out, self.sample_rate)
            elif step.name == "reverb":
                out = reverb(out, value, self.sample_rate, generator)
        return out

    def __repr__(self) -> str:
        return f"Augment({self.spec!r})"


def from_spec(spec: str) -> Augment:
    """The :class:`Augment` for ``spec`` (what ``train augment=...`` and ``evaluate --augment`` use)."""
    return Augment(spec)


# ---------------------------------------------------------------------------------------------
# Feature-space augmentation: on the cached features of a padded batch, at no decoding cost
# ---------------------------------------------------------------------------------------------
FEATURE_RANGES: dict[str, tuple[float, float]] = {
    "vtlp": (0.88, 1.12),  # vocal-tract length factor: the mel spectrum's frequency axis is scaled
    "tempo": (0.85, 1.15),  # speaking-rate factor: the time axis is resampled (lengths change)
    "fmask": (0.0, 6.0),  # width in mel bands of one band set to zero (SpecAugment)
    "tmask": (0.0, 15.0),  # width in frames of one stretch set to zero (SpecAugment)
}
FEATURE_PRESETS = {"specaugment": "vtlp,tempo,fmask,fmask,tmask,tmask"}


def _slaney_mel(hz: torch.Tensor) -> torch.Tensor:
    log_part = 15.0 + torch.log(hz.clamp(min=1000.0) / 1000.0) * (27.0 / math.log(6.4))
    return torch.where(hz < 1000.0, 3.0 * hz / 200.0, log_part)


def _slaney_hz(mel: torch.Tensor) -> torch.Tensor:
    return torch.where(mel < 15.0, 200.0 * mel / 3.0, 1000.0 * torch.exp((mel - 15.0) * (math.log(6.4) / 27.0)))


class FeatureAugment(torch.nn.Module):
    """Random perturbations of a padded feature batch ``(B, T, F)``, per utterance, in training mode.

    Built from a spec with the waveform syntax (``name[:value | :low..high][@probability]``):

    * ``vtlp``: vocal-tract length perturbation: each mel band takes the value of the band at
      ``factor`` times its centre frequency (log-mel ``fbank`` features only): the same words
      from a longer or shorter vocal tract, the main difference between voices;
    * ``tempo``: the time axis resampled by ``factor`` (linear interpolation; lengths change);
    * ``fmask`` / ``tmask``: SpecAugment's masks: one band or stretch of frames of the given width
      set to 0, the per-utterance mean of normalised features (list an item twice for two masks).

    ``"specaugment"`` is ``vtlp,tempo,fmask,fmask,tmask,tmask``. Draws come from torch's global
    RNG, so a seeded, resumed training run draws the same perturbations. In eval mode it returns
    its input unchanged.
    """

    def __init__(self, spec: str, features: str = "fbank", probability: float = 1.0,
                 f_min: float = 20.0, f_max: float = 8000.0) -> None:
        super().__init__()
        self.spec, self.steps = _parse_spec(spec, probability, FEATURE_RANGES, FEATURE_PRESETS,
                                            "'specaugment' or 'vtlp,tmask@0.5'")
        if features != "fbank" and any(step.name == "vtlp" for step in self.steps):
            raise AugmentError(f"vtlp scales the mel axis of fbank features; these are {features!r} features "
                               "(train with model.speech.features=fbank, or leave vtlp out)")
        self.f_min, self.f_max = f_min, f_max

    def _vtlp(self, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        bands = x.shape[-1]
        lo, hi = _slaney_mel(torch.tensor(self.f_min)), _slaney_mel(torch.tensor(self.f_max))
        step = (hi - lo) / (bands + 1)
        centres = lo + step * torch.arange(1, bands + 1, dtype=torch.float32, device=x.device)
        source_hz = _slaney_hz(centres)[None, :] * factor[:, None]
        position = ((_slaney_mel(source_hz) - lo) / step - 1.0).clamp(0, bands - 1)  # (B, F) fractional band
        left = position.floor().long()
        right = (left + 1).clamp(max=bands - 1)
        weight = (position - left)[:, None, :]
        gather = lambda idx: x.gather(2, idx[:, None, :].expand(-1, x.shape[1], -1))  # noqa: E731
        return gather(left) * (1 - weight) + gather(right) * weight

    def _tempo(self, x: torch.Tensor, lengths: torch.Tensor, rate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        new_lengths = (lengths.float() / rate).round().long().clamp(min=1)
        frames = int(new_lengths.max())
        position = torch.arange(frames, dtype=torch.float32, device=x.device)[None, :] * rate[:, None]
        position = torch.minimum(position, (lengths - 1).clamp(min=0)[:, None].float())
        left = position.floor().long()
        right = torch.minimum(left + 1, (lengths - 1).clamp(min=0)[:, None])
        weight = (position - left)[..., None]
        gather = lambda idx: x.gather(1, idx[..., None].expand(-1, -1, x.shape[2]))  # noqa: E731
        out = gather(left) * (1 - weight) + gather(right) * weight
        valid = torch.arange(frames, device=x.device)[None, :] < new_lengths[:, None]
        return out * valid[..., None], new_lengths

    @staticmethod
    def _mask(x: torch.Tensor, width: torch.Tensor, extent: torch.Tensor, axis: int) -> torch.Tensor:
        width = torch.minimum(width.floor().long(), extent // 4 if axis == 1 else extent)
        start = (torch.rand(len(width), device=x.device) * (extent - width + 1).float()).floor().long()
        index = torch.arange(x.shape[axis], device=x.device)[None, :]
        masked = (index >= start[:, None]) & (index < (start + width)[:, None])
        return x.masked_fill(masked[:, :, None] if axis == 1 else masked[:, None, :], 0.0)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.training:
            return x, lengths
        batch = x.shape[0]
        for step in self.steps:
            value = _draw(step, batch)[:, 0].to(x.device)
            if step.name == "vtlp":
                x = self._vtlp(x, value)
            elif step.name == "tempo":
                x, lengths = self._tempo(x, lengths, value)
            else:
                axis = 1 if step.name == "tmask" else 2
                extent = lengths if axis == 1 else torch.full_like(lengths, x.shape[2])
                x = self._mask(x, value, extent, axis)
        return x, lengths

    def extra_repr(self) -> str:
        return repr(self.spec)


IMAGE_RANGES: dict[str, tuple[float, float]] = {
    "rotate": (-10.0, 10.0),  # degrees
    "scale": (0.9, 1.1),  # zoom factor (> 1 enlarges the content)
    "shift": (-0.05, 0.05),  # translation along each axis, as a fraction of the image side
    "elastic": (0.0, 0.012),  # standard deviation of a smooth random displacement field, as a fraction of the side
}
IMAGE_PRESETS = {"affine": "rotate,scale,shift", "affine+elastic": "rotate,scale,shift,elastic"}
ELASTIC_GRID = 9  # the displacement field is random at 9 x 9 points, smooth in between (16 px apart at 128 px)


class ImageAugment(torch.nn.Module):
    """Random affine jitter of an image batch ``(B, 3, H, W)``, per image, in training mode.

    Spec items (the waveform syntax): ``rotate`` (degrees), ``scale`` (zoom), ``shift`` (each axis
    drawn separately, a fraction of the side) and ``elastic`` (a smooth random displacement field of
    that amplitude, the classic handwriting augmentation: strokes bend as another writer's would);
    ``"affine"`` is the first three, ``"affine+elastic"`` all four. No flips: they would swap left and
    right, which captions name. Pixels from outside the image repeat its border, so no black (a
    colour objects come in) appears. It makes a small training set's few handwritten glyphs look
    different every epoch, so the encoder learns the digit rather than the sample.
    Draws come from torch's global RNG (a seeded, resumed run draws the same); eval mode is the identity.
    """

    def __init__(self, spec: str, probability: float = 1.0) -> None:
        super().__init__()
        self.spec, self.steps = _parse_spec(spec, probability, IMAGE_RANGES, IMAGE_PRESETS, "'affine' or 'rotate:-5..5,shift'")
        self.elastic = any(step.name == "elastic" for step in self.steps)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return images
        batch = images.shape[0]
        angle, zoom = torch.zeros(batch), torch.ones(batch)
        shift = torch.zeros(batch, 2)
        elastic = torch.zeros(batch)
        for step in self.steps:  # an item listed twice composes with itself
            value = _draw(step, batch, 2 if step.name == "shift" else 1)
            if step.name == "rotate":
                angle = angle + torch.deg2rad(value[:, 0])
            elif step.name == "scale":
                zoom = zoom * value[:, 0]
            elif step.name == "elastic":
                elastic = elastic + value[:, 0]
            else:
                shift = shift + 2 * value  # affine_grid's coordinates span [-1, 1]
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        # theta maps output coordinates to the input coordinates they sample
        theta = torch.stack([torch.stack([cos, -sin, -shift[:, 0]], 1), torch.stack([sin, cos, -shift[:, 1]], 1)], 1)
        theta = theta.to(images.device, images.dtype)
        grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
        if self.elastic:
            field = torch.randn(batch, 2, ELASTIC_GRID, ELASTIC_GRID) * (2 * elastic)[:, None, None, None]
            field = torch.nn.functional.interpolate(field.to(images.device, images.dtype), size=images.shape[-2:],
                                                    mode="bicubic", align_corners=True)
            grid = grid + field.permute(0, 2, 3, 1)
        return torch.nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def extra_repr(self) -> str:
        return repr(self.spec)


def snr_db(clean, noisy) -> float:
    """The SNR of ``noisy`` against ``clean`` (same length), in dB."""
    clean, noisy = _as_wave(clean), _as_wave(noisy)
    return float(10 * torch.log10(_power(clean).sum() / _power(noisy - clean).sum()))


def band_energy(wave, sample_rate: int, low: float, high: float) -> float:
    """Fraction of ``wave``'s energy between ``low`` and ``high`` Hz."""
    power = torch.fft.rfft(_as_wave(wave)).abs().pow(2)
    freqs = torch.fft.rfftfreq(wave.shape[-1], d=1 / sample_rate)
    return float(power[..., (freqs >= low) & (freqs < high)].sum() / power.sum().clamp(min=1e-20))


__all__ = ["Augment", "AugmentError", "FEATURE_PRESETS", "FeatureAugment", "IMAGE_PRESETS", "ImageAugment", "PRESETS", "add_noise", "band_energy", "from_spec", "reverb", "snr_db",
           "speed", "telephone"]
