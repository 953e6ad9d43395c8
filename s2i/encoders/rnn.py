"""A bidirectional GRU/LSTM layer over a padded batch, as if each sequence ran alone.

Packed sequences give that (states never see padding), and they are cuDNN's fast path on a GPU, but on
a CPU their per-step kernels made the text encoder a fifth of the default's training step. There
:func:`bidirectional` runs the two directions as one-way passes over padded batches instead: the
forward direction over the batch as it is (padding at the end only follows the valid steps), the
backward direction over each sequence reversed within its own length; same outputs and gradients,
2.5x (the default's text encoder) to 5x (``rnn_small``'s speech encoder) as fast in bf16
(``bench/rnn_speed.py``).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from s2i.encoders.pooling import length_mask


def reverse_within(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``x (B, T, C)`` with each row's first ``lengths[b]`` steps in reverse order (padding stays put)."""
    t = torch.arange(x.shape[1], device=x.device)[None, :]
    lengths = lengths.to(x.device)[:, None]
    index = torch.where(t < lengths, lengths - 1 - t, t)
    return x.gather(1, index[:, :, None].expand(-1, -1, x.shape[2]))


def bidirectional(rnn: nn.RNNBase, x: torch.Tensor, lengths: torch.Tensor, packed: bool | None = None) -> torch.Tensor:
    """Outputs ``(B, T, 2 * hidden)`` of a one-layer bidirectional ``batch_first`` ``rnn`` over ``x (B, T,
    C)``, zero beyond each row's length. ``packed``: run on packed sequences (default: on CUDA only)."""
    if rnn.num_layers != 1 or not rnn.bidirectional or not rnn.batch_first:
        raise ValueError("bidirectional() takes a one-layer, bidirectional, batch_first RNN")
    if packed if packed is not None else x.is_cuda:
        seq = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        return pad_packed_sequence(rnn(seq)[0], batch_first=True, total_length=x.shape[1])[0]
    lengths = lengths.to(x.device)
    # the module's weights, one direction at a time, in a weightless one-way twin of the module
    one_way = type(rnn)(rnn.input_size, rnn.hidden_size, bias=rnn.bias, batch_first=True, device="meta")
    params = dict(rnn.named_parameters())
    forward = {k: v for k, v in params.items() if not k.endswith("_reverse")}
    backward = {k.removesuffix("_reverse"): v for k, v in params.items() if k.endswith("_reverse")}
    ahead = functional_call(one_way, forward, (x,))[0]
    behind = reverse_within(functional_call(one_way, backward, (reverse_within(x, lengths),))[0], lengths)
    out = torch.cat([ahead, behind], dim=-1)
    return out * length_mask(lengths, x.shape[1])[:, :, None].to(out.dtype)
