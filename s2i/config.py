"""Configurations as data: dataclasses for models and training, and presets named after the paper
they reproduce.

A model is fully described by a :class:`ModelConfig` (stored as ``config.json`` beside the
safetensors weights); a run by a :class:`TrainConfig`. Both round-trip through plain dicts
(:func:`to_dict` / :func:`from_dict`), which reject unknown keys and wrong types with a clear message.

VQ positions use ResDAVEnet-VQ's notation: a string of '0'/'1', one character per position, where
position 0 is the output of the front-end convolution and position i (1..n) the output of block i
(an RNN layer or a residual stage). ``"01100"`` quantises after blocks 1 and 2.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any


# ---------------------------------------------------------------------------------------------
# Model side
# ---------------------------------------------------------------------------------------------
@dataclass
class VQConfig:
    """Options shared by every VQ layer of a speech encoder (sizes are per position)."""

    decay: float = 0.99  # EMA decay of the codebook statistics
    eps: float = 1e-5  # Laplace smoothing of cluster sizes
    commitment_weight: float = 0.25  # seed: 0.25; ResDAVEnet-VQ: 1.0
    jitter: float = 0.0  # ResDAVEnet-VQ's temporal jitter probability (training only)
    dead_code_threshold: float = 0.0  # re-initialise codes whose EMA count falls below this
    kmeans_init: bool = False  # initialise codebooks from the first batch


@dataclass
class SpeechConfig:
    arch: str = "resdavenet"  # "rnn" (Merkx) | "resdavenet" (Harwath)
    features: str = "fbank"  # "mfcc" (the seed's 39-d) | "fbank" (ResDAVEnet's 40-d log-mel)
    # rnn: Conv1d front end -> stacked bidirectional RNN layers -> attention pooling
    conv_channels: int = 64
    conv_kernel: int = 6
    conv_stride: int = 2
    rnn_type: str = "lstm"  # "lstm" | "gru"
    hidden_size: int = 1024  # per direction; output dim = 2 * hidden_size
    num_layers: int = 4
    # resdavenet: conv front end -> len(widths) - 1 residual stages (stride 2 each)
    widths: tuple[int, ...] = (128, 256, 256, 512, 1024)
    blocks_per_stage: int = 2
    kernel_size: int = 9
    shortcut: str = "conv"  # "conv" (Harwath: strided 1x1 conv + BN) | "maxpool" (the seed)
    frontend: str = "conv"  # resdavenet front end: "conv" (Harwath: 40x1 collapsing frequency) | "pointwise" (the seed: Conv1d k=1)
    conv_bias: bool = True  # biases on the convolutions (the seed: on; Harwath: off, as BatchNorm follows them)
    # VQ
    vq_positions: str = ""  # e.g. "01100"; empty = no VQ
    vq_sizes: tuple[int, ...] = ()  # codebook size per position (same length as vq_positions)
    vq: VQConfig = field(default_factory=VQConfig)
    # pooling
    pooling: str = "attention"  # "attention" (the seed's vectorial self-attention) | "mean"
    attention_hidden: int = 128
    attention_heads: int = 1
    dropout: float = 0.0


@dataclass
class ImageConfig:
    arch: str = "linear"  # "linear" (precomputed CNN features) | "cnn" (small CNN on pixels) | "resnet" (torchvision backbone)
    in_dim: int = 2048  # linear: size of the precomputed feature vector
    # cnn
    image_size: int = 128
    channels: tuple[int, ...] = (16, 32, 64, 128)  # ~0.4 s forward+backward for 64 images on one CPU core
    # resnet
    backbone: str = "resnet50"
    weights: str | None = None  # a user-supplied local weights file; None = random init
    trainable_layers: int = 0  # how many of the backbone's last stages are fine-tuned


@dataclass
class TextConfig:
    arch: str = "word"  # "word" | "char"
    embed_dim: int = 300
    hidden_size: int = 512  # per direction, all layers but the last (which has ModelConfig.embed_dim // 2)
    num_layers: int = 2  # the seed's CMCL2022 text model: BiLSTM(300 -> 1024), BiLSTM(2048 -> 300)
    rnn_type: str = "lstm"
    vocab: list[str] = field(default_factory=list)  # index -> token; 0 = padding, 1 = unknown
    max_len: int = 128


@dataclass
class ModelConfig:
    name: str = "custom"
    embed_dim: int = 1024  # shared embedding size; the speech encoder's output is projected if it differs
    speech: SpeechConfig = field(default_factory=SpeechConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    text: TextConfig | None = None
    # the InfoNCE loss's learnable temperature lives in the model (log of 1/T)
    init_logit_scale: float = 2.659  # log(1/0.07), CLIP's starting point


# ---------------------------------------------------------------------------------------------
# Training side
# ---------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    data: str = "data/synthetic-default"  # a prepared corpus folder (``python -m s2i prepare ...``)
    out_dir: str = "runs/default"
    image_input: str = "pixels"  # "pixels" | the name of a cached image-feature set, e.g. "resnet152"
    batch_size: int = 32
    epochs: int = 32
    optimizer: str = "adam"
    lr: float = 2e-4  # peak learning rate
    min_lr: float = 1e-6
    weight_decay: float = 0.0
    schedule: str = "cyclic"  # "cyclic" (the seed's cyclic cosine, stepped per batch) | "cosine" (warm-up + cosine) | "constant"
    cycle_epochs: float = 4.0  # cyclic: epochs per LR cycle, from the real number of batches
    warmup_steps: int = 0
    loss: str = "hinge"  # "hinge" (the seed) | "triplet" (Harwath) | "infonce"
    margin: float = 0.2
    hardest_n: int = 0  # hinge: keep only the n largest hinge terms per row/column (0 = all)
    text_loss_weight: float = 0.0  # > 0 trains the text encoder against images too
    speech_text_loss_weight: float = 0.0  # > 0 also pulls each spoken caption towards its transcript's embedding
    grad_clip: float = 0.0  # max global gradient norm (0 = off)
    bucket: bool = True  # length-bucketed batches
    one_caption_per_image: bool = True
    hard_negatives: float = 0.0  # share of utterances that bring a caption of a similar image (by transcript
    #   words, ``similar_images``) into their batch: in-batch negatives that differ in a detail; 0 = random batches
    hard_negative_k: int = 5  # the similar images each image draws its hard negative from
    workers: int = 0
    amp: bool = True  # bf16 autocast of the encoders when on a GPU
    cpu_amp: bool = False  # bf16 autocast on a CPU too: faster where it has bf16 units (AMX, AVX512-BF16)
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    seed: int = 0
    eval_every: int = 1  # epochs between validation runs
    val_max_images: int = 0  # 0 = the whole validation split
    augment: str = ""  # comma-separated waveform augmentations, e.g. "noise,speed,telephone,reverb"
    feature_augment: str = ""  # augmentations of cached feature batches, e.g. "specaugment" or "vtlp,tmask"
    image_augment: str = ""  # affine jitter of training images, e.g. "affine" or "rotate,shift" (pixel encoders)
    init_from: str = ""  # warm start: load matching weights from this checkpoint (e.g. VQ {} -> {3})
    distill_weight: float = 0.0  # > 0 (with init_from): also pull each spoken caption towards the embedding the
    #   init_from model, frozen, gives it (cosine distance; the warm start's teacher: what new VQ layers should keep)
    freeze: str = ""  # comma-separated parts left as they are: speech, image, text, logit_scale (e.g. "image,text,logit_scale":
    #   a VQ stage that adapts only the speech encoder to the space of its init_from model)
    max_frames: int = 2048  # longer utterances are cropped (with a warning at prepare time)
    log_every: int = 50  # steps between metric lines
    max_steps: int = 0  # stop (with a checkpoint, resumable) after this many steps in all; 0 = run every epoch
    max_minutes: float = 0.0  # stop (with a checkpoint, resumable) after this much training wall time; 0 = no budget
    budget_minutes: float = 0.0  # finish after this much training wall time (or ``epochs``, whichever comes first),
    #   with the cosine schedule decayed to min_lr by then: as many epochs as the machine allows; 0 = epochs only
    eval_batch_size: int = 100  # utterances per batch when embedding the validation split (the seed: 100)
    tensorboard: bool = True  # also write TensorBoard logs to out_dir/tb

    @property
    def frozen_parts(self) -> tuple[str, ...]:
        """``freeze`` as a tuple of part names."""
        return tuple(p.strip() for p in self.freeze.split(",") if p.strip())

    def __post_init__(self) -> None:
        unknown = sorted(set(self.frozen_parts) - set(FREEZABLE))
        if unknown:
            raise ConfigError(f"freeze: unknown part(s) {', '.join(unknown)}; choose from {', '.join(FREEZABLE)}")
        for name, low in _TRAIN_MINIMA.items():
            value = getattr(self, name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{name}: expected a finite number, got {value!r}")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and (
                    value < low[0] or (low[1] and value == low[0])):
                raise ConfigError(f"{name}: must be {'above' if low[1] else 'at least'} {low[0]}, got {value!r}"
                                  + (f" ({low[2]})" if len(low) > 2 else ""))
        if self.hard_negatives > 1:
            raise ConfigError(f"hard_negatives: a share of the utterances, at most 1; got {self.hard_negatives!r}")


#: the parts of a model that ``TrainConfig.freeze`` can hold fixed
FREEZABLE = ("speech", "image", "text", "logit_scale")

#: the smallest value of each TrainConfig number: (bound, exclusive[, why])
_TRAIN_MINIMA: dict[str, tuple] = {
    "batch_size": (2, False, "an in-batch loss needs at least two utterances per batch"), "epochs": (1, False),
    "lr": (0, True), "min_lr": (0, False), "weight_decay": (0, False), "cycle_epochs": (0, True),
    "warmup_steps": (0, False), "margin": (0, False), "hardest_n": (0, False), "text_loss_weight": (0, False),
    "speech_text_loss_weight": (0, False), "grad_clip": (0, False), "workers": (0, False), "eval_every": (0, False), "val_max_images": (0, False),
    "max_frames": (1, False), "log_every": (1, False), "max_steps": (0, False), "max_minutes": (0, False),
    "budget_minutes": (0, False), "distill_weight": (0, False), "hard_negatives": (0, False), "hard_negative_k": (1, False),
    "eval_batch_size": (1, False),
}


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------
def _rnn(hidden: int, layers: int, rnn_type: str = "lstm", vq_positions: str = "", vq_sizes=()) -> SpeechConfig:
    return SpeechConfig(arch="rnn", features="mfcc", conv_channels=64, conv_kernel=6, conv_stride=2,
                        rnn_type=rnn_type, hidden_size=hidden, num_layers=layers,
                        vq_positions=vq_positions, vq_sizes=tuple(vq_sizes), pooling="attention")


def _conv(widths, vq_positions: str = "", vq_sizes=(), seed_style: bool = True) -> SpeechConfig:
    return SpeechConfig(arch="resdavenet", features="mfcc" if seed_style else "fbank", widths=tuple(widths),
                        shortcut="maxpool" if seed_style else "conv", frontend="pointwise" if seed_style else "conv",
                        conv_bias=seed_style,
                        vq_positions=vq_positions, vq_sizes=tuple(vq_sizes),
                        pooling="attention" if seed_style else "mean")


#: name -> (model config, training overrides). Names say which paper each one reproduces.
PRESETS: dict[str, tuple[ModelConfig, dict[str, Any]]] = {
    # Merkx, Frank & Ernestus, Interspeech 2021 ("rnn"): 4 x BiLSTM 1024, hinge 0.2, cyclic LR 2e-4.
    "merkx2021_rnn": (ModelConfig("merkx2021_rnn", 2048, _rnn(1024, 4), ImageConfig("linear", 2048)),
                      dict(loss="hinge", margin=0.2, schedule="cyclic", lr=2e-4, batch_size=32, epochs=32)),
    # Interspeech 2019: the same with GRUs.
    "merkx2019_gru": (ModelConfig("merkx2019_gru", 2048, _rnn(1024, 4, "gru"), ImageConfig("linear", 2048)),
                      dict(loss="hinge", margin=0.2, schedule="cyclic", lr=2e-4, batch_size=32, epochs=32)),
    # Merkx et al., Cognitive Computation 2022 ("rnn_VQ"): VQ 128 after layer 1, VQ 2048 after layer 2.
    "merkx2022_rnn_vq": (ModelConfig("merkx2022_rnn_vq", 2048, _rnn(1024, 4, vq_positions="01100", vq_sizes=(0, 128, 2048, 0, 0)),
                                     ImageConfig("linear", 2048)),
                         dict(loss="hinge", margin=0.2, schedule="cyclic", lr=2e-4, batch_size=32, epochs=32)),
    # The seed's ResDAVEnet re-implementation ("conv", "conv_VQ").
    "merkx2021_conv": (ModelConfig("merkx2021_conv", 1024, _conv((128, 128, 256, 512, 1024)), ImageConfig("linear", 2048)),
                       dict(loss="hinge", margin=0.2, schedule="cyclic", lr=2e-4, batch_size=32, epochs=32)),
    "merkx2021_conv_vq": (ModelConfig("merkx2021_conv_vq", 1024, _conv((128, 128, 256, 512, 1024), "01100", (0, 1024, 1024, 0, 0)),
                                      ImageConfig("linear", 2048)),
                          dict(loss="hinge", margin=0.2, schedule="cyclic", lr=2e-4, batch_size=32, epochs=32)),
    # Harwath, Hsu & Glass, ICLR 2020 (ResDAVEnet-VQ {2,3}, "01100"): log-mel, K=1024, commitment 1,
    # jitter 0.12, triplet loss with margin 1, Adam 2e-4, batch 64.
    "harwath2020_resdavenet_vq": (
        ModelConfig("harwath2020_resdavenet_vq", 1024,
                    dataclasses.replace(_conv((128, 256, 256, 512, 1024), "01100", (1024,) * 5, seed_style=False),
                                        vq=VQConfig(commitment_weight=1.0, jitter=0.12, eps=1e-8)),
                    ImageConfig("resnet", backbone="resnet50", image_size=224)),
        dict(loss="triplet", margin=1.0, schedule="constant", lr=2e-4, weight_decay=5e-7, batch_size=64, epochs=150)),
    # Small members of the same families that train on a laptop CPU (the built-in corpus).
    # rnn_small and rnn_vq_small differ only by the VQ layers (a clean with/without-VQ comparison); the front end
    # strides by 3 (30 ms frames) and the VQ layers start from k-means and re-seed dead codes, for CPU training.
    "rnn_small": (ModelConfig("rnn_small", 256, dataclasses.replace(_rnn(128, 3), conv_stride=3), ImageConfig("cnn"),
                              TextConfig()),
                  dict(loss="hinge", margin=0.2, schedule="cyclic", lr=1e-3, batch_size=64, epochs=16)),
    "rnn_vq_small": (ModelConfig("rnn_vq_small", 256,
                                 dataclasses.replace(_rnn(128, 3, vq_positions="0110", vq_sizes=(0, 64, 256, 0)),
                                                     conv_stride=3, vq=VQConfig(kmeans_init=True, dead_code_threshold=1.0)),
                                 ImageConfig("cnn"), TextConfig()),
                     dict(loss="hinge", margin=0.2, schedule="cyclic", lr=1e-3, batch_size=64, epochs=16)),
    "resdavenet_vq_small": (ModelConfig("resdavenet_vq_small", 256,
                                        dataclasses.replace(_conv((64, 64, 128, 128, 256), "00110", (0, 0, 256, 512, 0), seed_style=False),
                                                            pooling="attention", blocks_per_stage=1,
                                                            vq=VQConfig(kmeans_init=True, dead_code_threshold=1.0)),
                                        ImageConfig("cnn"), TextConfig()),
                            dict(loss="infonce", schedule="cosine", lr=1e-3, warmup_steps=200, batch_size=64, epochs=20)),
}
#: the seed's own preset names
ALIASES = {"rnn": "merkx2021_rnn", "rnn_VQ": "merkx2022_rnn_vq", "conv": "merkx2021_conv",
           "conv_VQ": "merkx2021_conv_vq", "gru": "merkx2019_gru"}


def preset(name: str) -> tuple[ModelConfig, dict[str, Any]]:
    """Return a fresh copy of a preset's (model config, training overrides)."""
    key = ALIASES.get(name, name)
    if key not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose from {sorted(PRESETS) + sorted(ALIASES)}")
    model, train = PRESETS[key]
    return from_dict(ModelConfig, to_dict(model)), dict(train)


# ---------------------------------------------------------------------------------------------
# dict round trip with validation
# ---------------------------------------------------------------------------------------------
class ConfigError(ValueError):
    """A configuration has unknown keys, wrong types or impossible values."""


def to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass config as a JSON-serialisable dict (tuples become lists)."""
    return dataclasses.asdict(cfg)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:  # e.g. TextConfig | None given a mapping: say what is wrong inside it
            raise errors[0]
        raise ConfigError(f"{where}: {value!r} does not fit {tp}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin in (tuple, list) and isinstance(value, str):
        import yaml

        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"{where}: {value!r} is not a list; write it like [0, 128, 2048]") from None
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return tuple(_coerce(args[0], v, where) for v in value)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return [_coerce(args[0], v, where) if args else v for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from a dict, refusing unknown keys and ill-typed values."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown key(s) {unknown}; valid keys: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{where + '.' if where else ''}{k}") for k, v in data.items()}
    return cls(**kwargs)


def apply_overrides(cfg: Any, overrides: list[str] | dict[str, Any]) -> Any:
    """Return a copy of ``cfg`` with ``key=value`` (or dotted ``a.b=value``) overrides applied.

    Values given as strings are converted to the field's type (``lr=1e-3``, ``bucket=false``,
    ``vq_sizes=[0,128]``, ``vq_positions=01100`` stays a string), then type-checked.
    """
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        items = []
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value")
            k, v = item.split("=", 1)
            items.append((k.strip(), v.strip()))
    data = to_dict(cfg)
    for key, value in items:
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise ConfigError(f"override {key!r}: {p!r} is not a section of {type(cfg).__name__}")
            node = node[p]
        if parts[-1] not in node:
            raise ConfigError(f"override {key!r}: unknown key {parts[-1]!r}; valid keys: {sorted(node)}")
        node[parts[-1]] = value
    return from_dict(type(cfg), data)
