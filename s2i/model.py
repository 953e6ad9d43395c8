"""The CLIP-like model API: one :class:`S2I` module holding a speech encoder, an image encoder and
optionally a text encoder that embed into one space, plus saving and loading checkpoints.

    model = s2i.load("default")                          # or a checkpoint folder
    speech = model.encode_speech([wave1, wave2])         # (2, D), L2-normalised
    images = model.encode_image([pil1, pil2, pil3])      # (3, D)
    scores = speech @ images.T                           # cosine similarities
    units = model.units(wave1)                           # {"vq2": UnitSequence, ...}

A checkpoint is a folder with ``model.safetensors`` (the weights) and ``config.json`` (the
:class:`~s2i.config.ModelConfig` and free-form ``extra``). Pickle files are never loaded: unpickling
can run arbitrary code.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from s2i.config import ConfigError, ModelConfig, from_dict, to_dict
from s2i.encoders.image import build_image_encoder
from s2i.encoders.speech import FEATURE_DIMS, SpeechOutput, build_speech_encoder
from s2i.encoders.text import build_text
from s2i.files import read_header
from s2i.vq import VectorQuantizer

log = logging.getLogger(__name__)

__all__ = ["S2I", "SpeechOutput", "UnitSequence", "CheckpointError", "MatchReport", "build_model", "save", "load",
           "load_matching", "available_models"]

FORMAT, VERSION = "s2i-model", 1
WEIGHTS, CONFIG = "model.safetensors", "config.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")
CHECKPOINTS = Path(__file__).resolve().parent.parent / "checkpoints"
SAMPLE_RATE = 16000


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete, corrupt, or does not fit its config."""


@dataclass
class UnitSequence:
    """The discrete units one VQ layer assigns to one utterance."""

    codes: torch.Tensor  # (T_l,) long
    frame_shift_s: float  # seconds between consecutive codes

    def segments(self) -> list[tuple[int, float, float]]:
        """Runs of equal codes as ``(code, start_s, end_s)``."""
        out: list[tuple[int, float, float]] = []
        codes = self.codes.tolist()
        start = 0
        for i in range(1, len(codes) + 1):
            if i == len(codes) or codes[i] != codes[start]:
                out.append((codes[start], start * self.frame_shift_s, i * self.frame_shift_s))
                start = i
        return out


class S2I(nn.Module):
    """Speech, image (and text) encoders into one embedding space.

    ``encode_*``, ``units`` and ``image_map`` compute gradients only when the model is in training
    mode (so in eval mode, as :func:`load` returns it, results are plain tensors); in training mode
    they behave like any module call.
    """

    def __init__(self, config: ModelConfig, load_image_weights: bool = True):
        super().__init__()
        from s2i.audio import feature_extractor

        self.config = config
        self.features = feature_extractor(config.speech.features)
        feature_dim = getattr(self.features, "dim", FEATURE_DIMS.get(config.speech.features))
        if feature_dim != FEATURE_DIMS.get(config.speech.features):
            raise ConfigError(f"speech.features {config.speech.features!r} gives {feature_dim}-d frames; "
                              f"the speech encoder expects {FEATURE_DIMS.get(config.speech.features)}")
        self.speech = build_speech_encoder(config.speech, config.embed_dim)
        self.image = build_image_encoder(config.image, config.embed_dim, load_weights=load_image_weights)
        self.tokenizer, self.text = build_text(config.text, config.embed_dim) if config.text else (None, None)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def _grad(self):
        return torch.set_grad_enabled(self.training and torch.is_grad_enabled())

    # ------------------------------------------------------------------ speech
    def encode_speech_features(self, feats: torch.Tensor, lengths: torch.Tensor, hidden: bool = False) -> SpeechOutput:
        """``feats (B, T, F)`` + ``lengths (B,)`` -> :class:`SpeechOutput` (embedding, frames, VQ codes ...);
        ``hidden=True`` also keeps every layer's activations (``SpeechOutput.hidden``, for analysis)."""
        with self._grad():
            return self.speech(feats.to(self.device), lengths.to(self.device), hidden=hidden)

    def speech_features(self, audio: Any, sample_rate: int = SAMPLE_RATE, lengths: torch.Tensor | None = None,
                        trim: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Waveform(s) -> ``(feats (B, T, F), frame_lengths (B,))`` (the model's own feature type);
        ``trim`` first cuts leading and trailing silence (:func:`s2i.audio.trim_silence`)."""
        waves, wave_lengths = self._waveforms(audio, sample_rate, lengths, trim)
        with torch.no_grad():
            return self.features(waves.to(self.device), wave_lengths.to(self.device))

    def encode_speech(self, audio: Any, sample_rate: int = SAMPLE_RATE, lengths: torch.Tensor | None = None,
                      trim: bool = True) -> torch.Tensor:
        """One utterance (1-D array/tensor), a list of them, or a ``(B, N)`` batch with ``lengths``
        -> ``(B, D)`` L2-normalised embeddings. Audio at another ``sample_rate`` is resampled.

        ``trim`` cuts leading and trailing silence first: the corpus captions have almost none, and
        per-utterance normalisation would count a microphone recording's silence in (the browser test's
        query, padded with half a second of silence, missed its image's top 5 without it)."""
        return self.encode_speech_features(*self.speech_features(audio, sample_rate, lengths, trim)).embedding

    def units(self, audio: Any, sample_rate: int = SAMPLE_RATE) -> dict[str, UnitSequence] | list[dict[str, UnitSequence]]:
        """The VQ codes of each VQ layer (``"vq{position}"``) for one utterance (a list: one dict each)."""
        single = not isinstance(audio, (list, tuple))
        was_training = self.training
        self.eval()  # codes must not depend on the mode: no jitter, no codebook update
        try:
            with torch.no_grad():
                out = self.encode_speech_features(*self.speech_features(audio, sample_rate))
        finally:
            self.train(was_training)
        result = []
        for b in range(out.embedding.shape[0]):
            result.append({name: UnitSequence(codes[b, : int(out.code_lengths[name][b])].cpu(),
                                              self.frame_shift(int(name[2:])))
                           for name, codes in out.codes.items()})
        return result[0] if single else result

    def frame_shift(self, position: int) -> float:
        """Seconds between frames at speech-encoder position ``position`` (0 = front end; VQ layer
        ``vq{p}`` and ``SpeechOutput.hidden["layer{p}"]`` run at position p)."""
        return float(getattr(self.features, "frame_shift", 0.01)) * self.speech.strides[position]

    def _waveforms(self, audio: Any, sample_rate: int, lengths: torch.Tensor | None,
                   trim: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        from s2i.audio import to_mono_16k, trim_silence

        if isinstance(audio, (list, tuple)):
            items = list(audio)
        else:
            x = torch.as_tensor(np.asarray(audio) if not isinstance(audio, torch.Tensor) else audio)
            if x.dim() == 1:
                items = [x]
            elif x.dim() == 2:
                n = lengths.tolist() if lengths is not None else [x.shape[1]] * x.shape[0]
                items = [x[i, : int(n[i])] for i in range(x.shape[0])]
            else:
                raise ValueError(f"audio must be one waveform (N,), a list of them, or a batch (B, N); "
                                 f"got shape {tuple(x.shape)}")
        if not items:
            raise ValueError("no audio given")
        waves = [to_mono_16k(w, sample_rate, name=f"utterance {i}") for i, w in enumerate(items)]
        if trim:
            waves = [trim_silence(w) for w in waves]
        wave_lengths = torch.tensor([w.shape[0] for w in waves], dtype=torch.long)
        batch = torch.zeros(len(waves), int(wave_lengths.max()))
        for i, w in enumerate(waves):
            batch[i, : w.shape[0]] = w
        return batch, wave_lengths

    # ------------------------------------------------------------------ images
    def preprocess_image(self, image: Any) -> torch.Tensor:
        """A PIL image, an ``H x W (x 3|4)`` array (uint8 or floats in [0, 1]) or a file path -> ``(3, S, S)``
        floats in [0, 1]: shorter side resized, centre-cropped to ``config.image.image_size``.
        A file that is no usable image raises :class:`s2i.encoders.image.ImageError` (a ValueError)."""
        from PIL import Image

        cfg = self.config.image
        if cfg.arch == "linear":
            raise ValueError(f"this model's image encoder takes precomputed {cfg.in_dim}-d feature vectors, "
                             "not pixels: pass a (batch, features) tensor to encode_image")
        if isinstance(image, (str, os.PathLike)):
            from s2i.encoders.image import open_image

            image = open_image(image)  # an ImageError for anything not a usable image
        if not isinstance(image, Image.Image):
            arr = np.asarray(image)
            if arr.dtype != np.uint8:
                arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
            image = Image.fromarray(arr)
        image = image.convert("RGB")
        size = cfg.image_size
        resize = size if cfg.arch == "cnn" else round(size * 256 / 224)  # ResNets: resize 256, crop 224
        w, h = image.size
        scale = resize / min(w, h)
        image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
        w, h = image.size
        left, top = (w - size) // 2, (h - size) // 2
        image = image.crop((left, top, left + size, top + size))
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()

    def _image_batch(self, images: Any) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            if images.dim() == 3 and getattr(self.image, "spatial", False):
                images = images[None]  # one preprocessed image (3, H, W)
            return images.to(self.device)
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise ValueError("no images given")
        return torch.stack([self.preprocess_image(im) for im in images]).to(self.device)

    def encode_image(self, images: Any) -> torch.Tensor:
        """Images (list of PIL / arrays / paths, or a preprocessed ``(B, 3, H, W)`` tensor, or
        ``(B, in_dim)`` features for a linear image encoder) -> ``(B, D)`` L2-normalised."""
        with self._grad():
            return self.image(self._image_batch(images))

    def image_map(self, images: Any) -> torch.Tensor | None:
        """Spatial image features ``(B, D, h, w)`` for matchmaps; None if the image encoder is not spatial."""
        if not getattr(self.image, "spatial", False):
            return None
        with self._grad():
            return self.image.forward_map(self._image_batch(images))

    # ------------------------------------------------------------------ text
    def encode_text(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Captions -> ``(B, D)`` L2-normalised. Raises ValueError if the model has no text encoder."""
        if self.text is None:
            raise ValueError(f"model {self.config.name!r} has no text encoder (its config has text=None)")
        if isinstance(texts, str):
            texts = [texts]
        ids, lengths = self.tokenizer.encode(list(texts))
        with self._grad():
            return self.text(ids.to(self.device), lengths.to(self.device))

    # ------------------------------------------------------------------ search
    @staticmethod
    def search(queries: torch.Tensor, gallery: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` gallery rows for each query by dot product: ``(scores, indices)``, each ``(Q, k)``.

        Embeddings from any two ``encode_*`` methods can be compared (speech -> image, image -> speech,
        text -> image, ...). For large galleries use :class:`s2i.search.Index` (approximate search).
        """
        from s2i.search import search

        return search(queries, gallery, k)


# ---------------------------------------------------------------------------------------------
# building, saving, loading
# ---------------------------------------------------------------------------------------------
def build_model(config: ModelConfig, state_dict: dict[str, torch.Tensor] | None = None) -> S2I:
    """A fresh :class:`S2I` for ``config``; with ``state_dict``, its weights (names and shapes must match)."""
    model = S2I(config, load_image_weights=state_dict is None)
    if state_dict is not None:
        _load_strict(model, state_dict, "the given state dict")
    return model


def _load_strict(model: S2I, state: dict[str, torch.Tensor], where: str) -> None:
    own = model.state_dict()
    for name, tensor in state.items():
        if name in own and tuple(tensor.shape) != tuple(own[name].shape):
            raise CheckpointError(f"{where}: tensor {name!r} has shape {tuple(tensor.shape)} in the checkpoint "
                                  f"but the config builds {tuple(own[name].shape)}")
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{where} does not fit its config: missing tensors {missing[:5]}"
                              f"{' ...' if len(missing) > 5 else ''}, unexpected tensors {unexpected[:5]}"
                              f"{' ...' if len(unexpected) > 5 else ''}")
    model.load_state_dict(state)


def _pickle_message(path: Path) -> str:
    return (f"{path}: pickle checkpoints are not loaded (they can run code); convert with: "
            f"python -c \"import torch, safetensors.torch as st; "
            f"st.save_file(torch.load('{path}', weights_only=True), 'model.safetensors')\" "
            f"and write a config.json beside it (see docs/DESIGN.md)")


def save(model: S2I, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` into ``directory``, atomically: everything goes to a
    temporary sibling folder that then replaces ``directory`` (other files already there are kept).

    An empty existing folder (such as the temporary folder of :func:`s2i.checkpoint.write_atomic`) holds
    nothing to protect: the files are written straight into it, the config last, so that a crash
    leaves no sibling folder behind and never a ``config.json`` beside incomplete weights.
    """
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    target = Path(directory)
    if target.is_dir() and not any(target.iterdir()):
        _write_model(model, target, extra)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _write_model(model, tmp, extra)
        if target.is_dir():
            for item in target.iterdir():  # keep what lives beside the model (gallery, layout ...)
                if item.name not in (WEIGHTS, CONFIG):
                    (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def _write_model(model: S2I, folder: Path, extra: dict[str, Any] | None) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": FORMAT})
    meta = {"format": FORMAT, "version": VERSION, "model": to_dict(model.config), "extra": extra or {}}
    (folder / CONFIG).write_text(json.dumps(meta, indent=1))


def available_models() -> list[str]:
    """Names :func:`load` accepts besides paths: the folders under ``<repo>/checkpoints`` with a model."""
    if not CHECKPOINTS.is_dir():
        return []
    return sorted(p.name for p in CHECKPOINTS.iterdir() if (p / CONFIG).is_file() and (p / WEIGHTS).is_file())


def _resolve(path_or_name: str | Path) -> Path:
    path = Path(path_or_name).expanduser()
    if isinstance(path_or_name, str) and not path.exists() and "/" not in path_or_name and (CHECKPOINTS / path_or_name).exists():
        path = CHECKPOINTS / path_or_name
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(_pickle_message(path))
    if not path.exists():
        names = available_models()
        raise CheckpointError(f"no checkpoint folder {str(path_or_name)!r}; give a folder with {WEIGHTS} + {CONFIG}"
                              f" or one of the available models {names}" if names else
                              f"no checkpoint folder {str(path_or_name)!r}; give a folder with {WEIGHTS} + {CONFIG}"
                              f" (no named models are installed under {CHECKPOINTS})")
    if path.is_file():
        if path.name in (WEIGHTS, CONFIG):
            path = path.parent
        else:
            raise CheckpointError(f"{path} is a file; give the checkpoint folder that holds {WEIGHTS} + {CONFIG}")
    if not (path / WEIGHTS).is_file():
        pickles = sorted(p for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(_pickle_message(pickles[0]))
    for name in (CONFIG, WEIGHTS):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint folder {path} has no {name} (a checkpoint is {WEIGHTS} + {CONFIG})")
    return path


def read_config(path: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """``(ModelConfig, extra)`` from a checkpoint folder's ``config.json``."""
    folder = _resolve(path)
    meta = read_header(folder / CONFIG, FORMAT, VERSION, CheckpointError, "model config")
    try:
        config = from_dict(ModelConfig, meta.get("model"), "model")
    except ConfigError as exc:
        raise CheckpointError(f"{folder / CONFIG}: {exc}") from None
    return config, meta.get("extra") or {}


def read_weights(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint folder's ``model.safetensors`` (never unpickles)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = _resolve(path) / WEIGHTS
    try:
        return load_file(str(file), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{file} is truncated or corrupt ({exc}); re-save or re-download it") from None


def load(path_or_name: str | Path = "default", device: str | torch.device = "cpu") -> S2I:
    """A checkpoint folder or a name from :func:`available_models` -> :class:`S2I` in eval mode on ``device``."""
    config, _ = read_config(path_or_name)
    state = read_weights(path_or_name)
    try:
        model = S2I(config, load_image_weights=False)
    except ConfigError as exc:
        raise CheckpointError(f"{_resolve(path_or_name) / CONFIG}: {exc}") from None
    _load_strict(model, state, str(_resolve(path_or_name)))
    return model.to(device).eval()


@dataclass
class MatchReport:
    """What :func:`load_matching` copied and what it left as initialised."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the checkpoint
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, not in the model
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)  # name, ckpt, model
    reinitialized_vq: list[str] = field(default_factory=list)  # VQ layers that will initialise from data

    def __str__(self) -> str:
        parts = [f"{len(self.loaded)} tensors loaded"]
        if self.missing:
            parts.append(f"{len(self.missing)} left as initialised (e.g. {self.missing[:3]})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} in the checkpoint unused (e.g. {self.unexpected[:3]})")
        if self.mismatched:
            parts.append("shape mismatches: " + ", ".join(f"{n} {a} vs {b}" for n, a, b in self.mismatched[:3]))
        if self.reinitialized_vq:
            parts.append(f"VQ layers {self.reinitialized_vq} initialise by k-means on the first training batch")
        return "; ".join(parts)


def load_matching(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> MatchReport:
    """Warm start: copy every tensor whose name and shape match, leave the rest initialised.

    A VQ layer absent from ``state_dict`` (a model trained without it, ResDAVEnet-VQ's ``{} -> {3}``) is
    marked uninitialised, so its codebook is set by k-means on the first training batch's frames.
    """
    own = model.state_dict()
    report = MatchReport()
    matching = {}
    for name, tensor in state_dict.items():
        if name not in own:
            report.unexpected.append(name)
        elif tuple(own[name].shape) != tuple(tensor.shape):
            report.mismatched.append((name, tuple(tensor.shape), tuple(own[name].shape)))
        else:
            matching[name] = tensor
    report.loaded = sorted(matching)
    report.missing = sorted(set(own) - set(matching))
    model.load_state_dict(matching, strict=False)
    for prefix, module in model.named_modules():
        if isinstance(module, VectorQuantizer) and f"{prefix}.codebook" not in matching:
            module.initialized.fill_(False)
            report.reinitialized_vq.append(prefix)
    log.info("load_matching: %s", report)
    return report
