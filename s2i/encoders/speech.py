"""Speech encoders: a padded batch of feature frames ``(B, T, F)`` + ``lengths`` -> one L2-normalised
vector per utterance, plus the frames, VQ codes and VQ losses on the way.

* :class:`RNNSpeechEncoder` — Merkx et al. (2019, 2021, 2022): Conv1d front end -> stacked
  bidirectional GRU/LSTM layers (padding unseen, :mod:`.rnn`) -> vectorial self-attention.
* :class:`ResDAVEnet` — Harwath et al. (ICLR 2020), and the seed's re-implementation of it: a front
  end that collapses frequency -> residual stages of 1-D convolutions (stride 2 each) -> pooling.

Both are **length-aware**: padded frames never change an utterance's embedding. Convolutions see zeros
beyond each utterance's end (padding is re-zeroed after every layer), BatchNorm statistics are taken
over valid frames only (:class:`MaskedBatchNorm1d`), VQ statistics and pooling are masked, RNN
states never see padding (:func:`s2i.encoders.rnn.bidirectional`). So an utterance embeds the same
alone or inside a batch of longer ones.

VQ layers may sit at positions ``0..n`` (ResDAVEnet-VQ's notation, see :mod:`s2i.config`): position 0
is the front end's output, position i the output of RNN layer / residual stage i. They are named
``vq{position}``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from s2i.config import ConfigError, SpeechConfig, VQConfig
from s2i.encoders.pooling import build_pooling, length_mask
from s2i.encoders.rnn import bidirectional
from s2i.vq import VectorQuantizer

#: size of one frame of each feature type made by :func:`s2i.audio.feature_extractor`
FEATURE_DIMS = {"mfcc": 39, "fbank": 40}


@dataclass
class SpeechOutput:
    """What a speech encoder returns (see docs/DESIGN.md, "The model API")."""

    embedding: torch.Tensor  # (B, D), L2-normalised
    frames: torch.Tensor  # (B, T', C): the last layer before pooling, zero beyond `lengths`
    lengths: torch.Tensor  # (B,) valid frames of `frames`
    vq_loss: torch.Tensor  # scalar: sum of the VQ layers' commitment losses (0 without VQ)
    codes: dict[str, torch.Tensor] = field(default_factory=dict)  # "vq{p}" -> (B, T_p), -1 at padding
    code_lengths: dict[str, torch.Tensor] = field(default_factory=dict)  # "vq{p}" -> (B,)
    vq_stats: dict[str, dict[str, float]] = field(default_factory=dict)  # "vq{p}" -> perplexity, usage
    # with ``hidden=True``: "layer{p}" -> (activations (B, T_p, C_p) before any VQ, their lengths (B,))
    hidden: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None


def parse_vq_positions(positions: str, sizes: tuple[int, ...], num_positions: int) -> dict[int, int]:
    """``"01100"``, ``(0, 128, 2048, 0, 0)`` -> ``{1: 128, 2: 2048}`` after checking both fit the encoder."""
    if not positions:
        return {}
    if set(positions) - {"0", "1"}:
        raise ConfigError(f"vq_positions {positions!r} must be a string of 0s and 1s, e.g. '01100'")
    if len(positions) > num_positions:
        raise ConfigError(f"vq_positions {positions!r} has {len(positions)} positions but this encoder has "
                          f"{num_positions} (0 = front end, 1..{num_positions - 1} = its layers)")
    if len(sizes) != len(positions):
        raise ConfigError(f"vq_sizes {tuple(sizes)} must give one codebook size per character of "
                          f"vq_positions {positions!r}")
    chosen = {p: int(sizes[p]) for p, c in enumerate(positions) if c == "1"}
    for p, k in chosen.items():
        if k < 1:
            raise ConfigError(f"vq_sizes[{p}] is {k} but VQ position {p} is on; give it a codebook size")
    return chosen


class _SpeechEncoder(nn.Module):
    """What both architectures share: VQ layers between blocks, pooling, projection, L2."""

    out_dim: int  # embedding size

    def _make_vq(self, positions: dict[int, int], dims: list[int], vq: VQConfig) -> None:
        self.vq = nn.ModuleDict({
            f"vq{p}": VectorQuantizer(dims[p], k, decay=vq.decay, eps=vq.eps,
                                      commitment_weight=vq.commitment_weight, jitter=vq.jitter,
                                      dead_code_threshold=vq.dead_code_threshold, kmeans_init=vq.kmeans_init)
            for p, k in sorted(positions.items())})

    def _make_head(self, channels: int, embed_dim: int | None, pooling: str, hidden: int, heads: int) -> None:
        self.pooling = build_pooling(pooling, channels, hidden, heads)
        pooled = self.pooling.out_dim
        self.out_dim = embed_dim or pooled
        self.project = nn.Linear(pooled, self.out_dim) if self.out_dim != pooled else nn.Identity()

    def _quantize(self, position: int, x: torch.Tensor, lengths: torch.Tensor, out: SpeechOutput) -> torch.Tensor:
        """Apply VQ layer ``vq{position}`` if there is one, recording its codes, loss and statistics."""
        if out.hidden is not None:
            out.hidden[f"layer{position}"] = (x, lengths)
        name = f"vq{position}"
        if name not in self.vq:
            return x
        res = self.vq[name](x, length_mask(lengths, x.shape[1]))
        out.vq_loss = out.vq_loss + res.loss
        out.codes[name] = res.codes
        out.code_lengths[name] = lengths
        out.vq_stats[name] = {"perplexity": float(res.perplexity), "usage": float(res.usage)}
        return res.quantized

    def _finish(self, frames: torch.Tensor, lengths: torch.Tensor, out: SpeechOutput) -> SpeechOutput:
        out.frames, out.lengths = frames, lengths
        out.embedding = F.normalize(self.project(self.pooling(frames, lengths)), dim=-1)
        return out

    @staticmethod
    def _start(x: torch.Tensor, lengths: torch.Tensor, hidden: bool = False) -> tuple[torch.Tensor, SpeechOutput]:
        if x.dim() != 3:
            raise ValueError(f"speech features must be (batch, frames, features); got shape {tuple(x.shape)}")
        lengths = lengths.to(device=x.device, dtype=torch.long).clamp(max=x.shape[1])
        if bool((lengths < 1).any()):
            raise ValueError("every utterance needs at least one frame (a length was 0)")
        x = x * length_mask(lengths, x.shape[1])[:, :, None].to(x.dtype)  # whatever the padding held
        empty = SpeechOutput(x.new_zeros(0), x.new_zeros(0), lengths, x.new_zeros(()).float(), hidden={} if hidden else None)
        return x, empty


class RNNSpeechEncoder(_SpeechEncoder):
    """Merkx et al.'s encoder: Conv1d(F -> C, k, s) -> ``num_layers`` bidirectional GRU/LSTM layers
    (each ``2 * hidden`` wide; states never see padding) -> masked
    vectorial self-attention -> (projection) -> L2.

    Frame counts after the front end: ``floor((l - k) / s) + 1``. Utterances shorter than the kernel are
    zero-padded to it (alone and in a batch alike).
    """

    def __init__(self, in_dim: int, embed_dim: int | None = None, *, conv_channels: int = 64, conv_kernel: int = 6,
                 conv_stride: int = 2, conv_bias: bool = True, rnn_type: str = "lstm", hidden_size: int = 1024,
                 num_layers: int = 4, vq_positions: str = "", vq_sizes: tuple[int, ...] = (),
                 vq: VQConfig | None = None, pooling: str = "attention", attention_hidden: int = 128,
                 attention_heads: int = 1, dropout: float = 0.0):
        super().__init__()
        if rnn_type not in ("lstm", "gru"):
            raise ConfigError(f"rnn_type {rnn_type!r}: choose 'lstm' or 'gru'")
        self.kernel, self.stride = conv_kernel, conv_stride
        self.conv = nn.Conv1d(in_dim, conv_channels, conv_kernel, conv_stride, bias=conv_bias)
        rnn = nn.LSTM if rnn_type == "lstm" else nn.GRU
        dims = [conv_channels] + [2 * hidden_size] * num_layers
        self.rnns = nn.ModuleList(rnn(dims[i], hidden_size, batch_first=True, bidirectional=True)
                                  for i in range(num_layers))
        self.dropout = nn.Dropout(dropout)
        self._make_vq(parse_vq_positions(vq_positions, vq_sizes, num_layers + 1), dims, vq or VQConfig())
        self._make_head(dims[-1], embed_dim, pooling, attention_hidden, attention_heads)
        #: downsampling (in input frames) at each VQ position
        self.strides = [conv_stride] * (num_layers + 1)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, hidden: bool = False) -> SpeechOutput:
        x, out = self._start(x, lengths, hidden)
        if x.shape[1] < self.kernel:
            x = F.pad(x, (0, 0, 0, self.kernel - x.shape[1]))
        lengths = torch.div(out.lengths.clamp(min=self.kernel) - self.kernel, self.stride, rounding_mode="floor") + 1
        h = self.conv(x.transpose(1, 2)).transpose(1, 2)
        h = h * length_mask(lengths, h.shape[1])[:, :, None].to(h.dtype)
        h = self._quantize(0, h, lengths, out)
        for i, rnn in enumerate(self.rnns, start=1):
            if i > 1:
                h = self.dropout(h)
            h = self._quantize(i, bidirectional(rnn, h, lengths), lengths, out)
        return self._finish(h, lengths, out)


class MaskedBatchNorm1d(nn.Module):
    """BatchNorm over ``(B, C, T)`` whose batch statistics use valid frames only; output is zero on padding.

    Same parameters and buffers as :class:`torch.nn.BatchNorm1d` (deliberately not a subclass, so that
    ``convert_sync_batchnorm`` does not swap it for an unmasked one).
    """

    def __init__(self, channels: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask[:, None, :].to(torch.float32)
        if self.training:
            xf = x.float()
            n = m.sum().clamp(min=1)
            mean = (xf * m).sum((0, 2)) / n
            var = ((xf - mean[None, :, None]).pow(2) * m).sum((0, 2)) / n
            with torch.no_grad():
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var * n / (n - 1).clamp(min=1), self.momentum)
                self.num_batches_tracked += 1
        else:
            mean, var = self.running_mean, self.running_var
        scale = self.weight * torch.rsqrt(var + self.eps)
        y = (x.float() - mean[None, :, None]) * scale[None, :, None] + self.bias[None, :, None]
        return (y * m).to(x.dtype)


class BasicBlock(nn.Module):
    """``ReLU(BN(conv(ReLU(BN(conv_s(x))))) + shortcut(x))`` with 1-D convolutions of odd ``kernel``.

    Shortcut when the shape changes: ``"conv"`` = strided 1x1 conv + BN (Harwath); ``"maxpool"`` =
    max-pool by ``stride`` then a 1x1 conv (the seed's ``res_conv``).
    """

    def __init__(self, cin: int, cout: int, kernel: int = 9, stride: int = 1, shortcut: str = "conv",
                 bias: bool = False):
        super().__init__()
        if kernel % 2 == 0:
            raise ConfigError(f"kernel_size must be odd for length-preserving padding; got {kernel}")
        if shortcut not in ("conv", "maxpool"):
            raise ConfigError(f"shortcut {shortcut!r}: choose 'conv' or 'maxpool'")
        self.stride, self.shortcut = stride, shortcut
        self.conv1 = nn.Conv1d(cin, cout, kernel, stride, padding=kernel // 2, bias=bias)
        self.bn1 = MaskedBatchNorm1d(cout)
        self.conv2 = nn.Conv1d(cout, cout, kernel, 1, padding=kernel // 2, bias=bias)
        self.bn2 = MaskedBatchNorm1d(cout)
        needs_conv = cin != cout or stride != 1  # the seed keeps its 1x1 conv even at equal widths
        self.down = nn.Conv1d(cin, cout, 1, stride if shortcut == "conv" else 1, bias=bias) if needs_conv else None
        self.down_bn = MaskedBatchNorm1d(cout) if needs_conv and shortcut == "conv" else None

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x (B, C, T)``, zero beyond ``lengths`` -> ``(y, new_lengths)`` with ``ceil(l / stride)`` frames."""
        new_lengths = torch.div(lengths + self.stride - 1, self.stride, rounding_mode="floor")
        h = self.conv1(x)
        mask = length_mask(new_lengths, h.shape[2])
        h = self.conv2(F.relu(self.bn1(h, mask)))
        h = self.bn2(h, mask)
        s = x
        if self.shortcut == "maxpool" and self.stride > 1:
            s = F.max_pool1d(F.pad(s, (0, -s.shape[2] % self.stride)), self.stride)
        if self.down is not None:
            s = self.down(s)
        if self.down_bn is not None:
            s = self.down_bn(s, mask)
        return F.relu(h + s) * mask[:, None, :].to(h.dtype), new_lengths


class ResDAVEnet(_SpeechEncoder):
    """ResDAVEnet (Harwath et al.): front end -> ``len(widths) - 1`` residual stages of
    ``blocks_per_stage`` :class:`BasicBlock` (the first of each with stride 2) -> masked pooling ->
    projection to ``embed_dim`` if ``widths[-1]`` differs -> L2.

    ``frontend="conv"``: Harwath's 40x1 convolution collapsing frequency (a Conv1d with F input
    channels and kernel 1) + BN + ReLU; ``"pointwise"``: the seed's plain Conv1d(k=1).
    """

    def __init__(self, in_dim: int, embed_dim: int | None = None, *, widths: tuple[int, ...] = (128, 256, 256, 512, 1024),
                 blocks_per_stage: int = 2, kernel_size: int = 9, shortcut: str = "conv", frontend: str = "conv",
                 conv_bias: bool = False, vq_positions: str = "", vq_sizes: tuple[int, ...] = (),
                 vq: VQConfig | None = None, pooling: str = "mean", attention_hidden: int = 128,
                 attention_heads: int = 1):
        super().__init__()
        if frontend not in ("conv", "pointwise"):
            raise ConfigError(f"frontend {frontend!r}: choose 'conv' or 'pointwise'")
        if len(widths) < 2:
            raise ConfigError(f"widths {widths} needs at least two entries (front end + one stage)")
        self.front = nn.Conv1d(in_dim, widths[0], 1, bias=conv_bias)
        self.front_bn = MaskedBatchNorm1d(widths[0]) if frontend == "conv" else None
        self.stages = nn.ModuleList(
            nn.ModuleList(BasicBlock(widths[i] if b == 0 else widths[i + 1], widths[i + 1], kernel_size,
                                     2 if b == 0 else 1, shortcut, conv_bias) for b in range(blocks_per_stage))
            for i in range(len(widths) - 1))
        self._make_vq(parse_vq_positions(vq_positions, vq_sizes, len(widths)), list(widths), vq or VQConfig())
        self._make_head(widths[-1], embed_dim, pooling, attention_hidden, attention_heads)
        self.strides = [2 ** p for p in range(len(widths))]

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, hidden: bool = False) -> SpeechOutput:
        x, out = self._start(x, lengths, hidden)
        lengths = out.lengths
        h = self.front(x.transpose(1, 2))  # (B, C, T)
        mask = length_mask(lengths, h.shape[2])
        h = F.relu(self.front_bn(h, mask)) if self.front_bn is not None else h * mask[:, None, :].to(h.dtype)
        h = self._quantize(0, h.transpose(1, 2), lengths, out).transpose(1, 2)
        for i, stage in enumerate(self.stages, start=1):
            for block in stage:
                h, lengths = block(h, lengths)
            h = self._quantize(i, h.transpose(1, 2), lengths, out).transpose(1, 2)
        return self._finish(h.transpose(1, 2), lengths, out)


def build_speech_encoder(cfg: SpeechConfig, embed_dim: int | None = None) -> _SpeechEncoder:
    """The encoder a :class:`SpeechConfig` describes, with output size ``embed_dim``."""
    if cfg.features not in FEATURE_DIMS:
        raise ConfigError(f"speech.features {cfg.features!r}: choose one of {sorted(FEATURE_DIMS)}")
    in_dim = FEATURE_DIMS[cfg.features]
    common = dict(vq_positions=cfg.vq_positions, vq_sizes=tuple(cfg.vq_sizes), vq=cfg.vq, pooling=cfg.pooling,
                  attention_hidden=cfg.attention_hidden, attention_heads=cfg.attention_heads)
    if cfg.arch == "rnn":
        return RNNSpeechEncoder(in_dim, embed_dim, conv_channels=cfg.conv_channels, conv_kernel=cfg.conv_kernel,
                                conv_stride=cfg.conv_stride, conv_bias=cfg.conv_bias, rnn_type=cfg.rnn_type,
                                hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, dropout=cfg.dropout, **common)
    if cfg.arch == "resdavenet":
        return ResDAVEnet(in_dim, embed_dim, widths=tuple(cfg.widths), blocks_per_stage=cfg.blocks_per_stage,
                          kernel_size=cfg.kernel_size, shortcut=cfg.shortcut, frontend=cfg.frontend,
                          conv_bias=cfg.conv_bias, **common)
    raise ConfigError(f"speech.arch {cfg.arch!r}: choose 'rnn' or 'resdavenet'")
