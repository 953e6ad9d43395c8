"""Image encoders: images -> one L2-normalised vector each, and (where spatial) a feature map for
matchmaps.

* :class:`LinearImageEncoder` — the seed's: a linear map of precomputed CNN features (e.g. 2048-d).
* :class:`SmallCNN` — a small convolutional net on pixels, fast on a CPU (the built-in corpus).
* :class:`BackboneImageEncoder` — a torchvision ResNet trunk (Harwath's ResNet-50) + 1x1 projection.
  Weights come from a local file the user supplies, or random init; nothing is ever downloaded.

Pixel encoders take ``(B, 3, H, W)`` floats in [0, 1] and apply ImageNet normalisation themselves.
Every encoder has ``forward(images) -> (B, D)``; spatial ones also ``forward_map(images) -> (B, D, h, w)``
(``spatial = True``), whose spatial mean, L2-normalised, is ``forward``.
"""
from __future__ import annotations

import logging
import os
import struct
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from s2i.config import ConfigError, ImageConfig

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageError(ValueError):
    """An image file that cannot be used; the message says what is wrong with it."""


def open_image(path: str | os.PathLike, draft: tuple[int, int] | None = None):
    """Decode an image file into an RGB ``PIL.Image``, or raise :class:`ImageError` saying why.

    Images with more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` (PIL's decompression-bomb limit,
    89 M by default; set it to change the limit) are refused from their header, before anything is
    decoded. ``draft``: let JPEG decode at a reduced scale near this size (a fast validity check).
    """
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise ImageError(f"expected an image file, got a folder: {path}" if path.is_dir()
                         else f"image file not found: {path}")
    if path.stat().st_size == 0:
        raise ImageError(f"image file is empty (0 bytes): {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, with a message
            with Image.open(path) as im:
                limit = Image.MAX_IMAGE_PIXELS
                if limit and im.size[0] * im.size[1] > limit:
                    raise Image.DecompressionBombError(f"{im.size[0]} x {im.size[1]} pixels")
                if draft is not None:
                    im.draft("RGB", draft)
                return im.convert("RGB")
    except Image.DecompressionBombError as e:
        raise ImageError(f"image file {path} is too large to decode safely ({e}; a decompression bomb?): the limit "
                         f"is {Image.MAX_IMAGE_PIXELS:,} pixels (PIL.Image.MAX_IMAGE_PIXELS); resize it first") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"image file {path} cannot be decoded (not an image format PIL reads)") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as e:
        raise ImageError(f"image file {path} cannot be decoded ({e or type(e).__name__}; truncated or corrupt?)") from None


class LinearImageEncoder(nn.Module):
    """``Linear(in_dim -> embed_dim)`` (xavier-uniform weight) on precomputed features, then L2."""

    spatial = False

    def __init__(self, in_dim: int = 2048, embed_dim: int = 1024):
        super().__init__()
        self.in_dim = in_dim
        self.linear = nn.Linear(in_dim, embed_dim)
        nn.init.xavier_uniform_(self.linear.weight)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() != 2 or features.shape[1] != self.in_dim:
            raise ValueError(f"this image encoder takes precomputed feature vectors (batch, {self.in_dim}); "
                             f"got shape {tuple(features.shape)}")
        return F.normalize(self.linear(features), dim=-1)


class _PixelEncoder(nn.Module):
    """ImageNet normalisation, ``forward_map`` -> ``forward`` by mean pooling + L2."""

    spatial = True

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def _check(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (batch, 3, height, width) in [0, 1]; got shape {tuple(images.shape)}")
        return (images - self.mean) / self.std

    def forward_map(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.forward_map(images).mean(dim=(2, 3)), dim=-1)


class SmallCNN(_PixelEncoder):
    """``len(channels)`` blocks of [3x3 conv stride 2 + BN + ReLU, 3x3 conv + BN + ReLU], then a 1x1
    projection to ``embed_dim``: a 128x128 image gives an 8x8 map with four blocks."""

    def __init__(self, embed_dim: int = 256, channels: tuple[int, ...] = (32, 64, 128, 256)):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for c in channels:
            layers += [nn.Conv2d(cin, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                       nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            cin = c
        self.body = nn.Sequential(*layers)
        self.project = nn.Conv2d(cin, embed_dim, 1)

    def forward_map(self, images: torch.Tensor) -> torch.Tensor:
        return self.project(self.body(self._check(images)))


class BackboneImageEncoder(_PixelEncoder):
    """A torchvision ResNet without its pooling and classifier, + a 1x1 conv to ``embed_dim``.

    ``weights``: a local ``.safetensors`` or ``.pth`` state dict of the torchvision model (read with
    ``weights_only=True``: no code runs); None = random init. Only the last ``trainable_layers`` of the
    four residual stages are trained; frozen stages keep their BatchNorm in eval mode.
    """

    def __init__(self, embed_dim: int = 1024, backbone: str = "resnet50", weights: str | None = None,
                 trainable_layers: int = 0):
        super().__init__()
        import torchvision

        if not backbone.startswith("resnet") or not hasattr(torchvision.models, backbone):
            raise ConfigError(f"image.backbone {backbone!r}: choose a torchvision ResNet (resnet18 ... resnet152)")
        net = getattr(torchvision.models, backbone)(weights=None)
        if weights:
            net.load_state_dict(read_state_dict(weights))
            log.info("loaded %s weights from %s", backbone, weights)
        self.trunk = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool,
                                   net.layer1, net.layer2, net.layer3, net.layer4)
        self.project = nn.Conv2d(net.fc.in_features, embed_dim, 1)
        self.frozen = self.trunk[: len(self.trunk) - max(0, min(trainable_layers, 4))]
        for p in self.frozen.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> "BackboneImageEncoder":
        super().train(mode)
        self.frozen.eval()  # frozen BatchNorm keeps its statistics
        return self

    def forward_map(self, images: torch.Tensor) -> torch.Tensor:
        return self.project(self.trunk(self._check(images)))


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a local ``.safetensors`` file, or a ``.pth`` state dict read without unpickling code."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"image weights file {path} does not exist (weights are never downloaded; "
                          "give a local torchvision state dict)")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise ConfigError(f"image weights file {path} is truncated or corrupt ({exc})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling refusal becomes one clear message
        raise ConfigError(f"could not read {path} as a plain state dict ({exc})") from exc
    return state.get("state_dict", state) if isinstance(state, dict) else state


def build_image_encoder(cfg: ImageConfig, embed_dim: int, load_weights: bool = True) -> nn.Module:
    """The encoder an :class:`ImageConfig` describes. ``load_weights=False`` skips reading
    ``cfg.weights`` (the model's own checkpoint will overwrite them anyway)."""
    if cfg.arch == "linear":
        return LinearImageEncoder(cfg.in_dim, embed_dim)
    if cfg.arch == "cnn":
        return SmallCNN(embed_dim, tuple(cfg.channels))
    if cfg.arch == "resnet":
        return BackboneImageEncoder(embed_dim, cfg.backbone, cfg.weights if load_weights else None,
                                    cfg.trainable_layers)
    raise ConfigError(f"image.arch {cfg.arch!r}: choose 'linear', 'cnn' or 'resnet'")
