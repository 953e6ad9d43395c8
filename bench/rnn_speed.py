"""Bidirectional RNN layers on packed sequences against one-way passes over padded batches
(:func:`s2i.encoders.rnn.bidirectional`): forward + backward time of the text encoder and of the
``rnn_small`` speech encoder, the same modules and batches both ways.

    python bench/rnn_speed.py                 # CPU: bf16 autocast (as the default recipe trains) and float32
    python bench/rnn_speed.py --device cuda --json bench/rnn_speed.json

The text encoder has the default model's sizes (word tokens of 300 d, a 256-unit layer, then 128 per
direction to the 256-d space), 64 captions of 8-25 words; the speech encoder is ``rnn_small`` on
64 utterances of 150-500 MFCC frames. The two ways agree to float rounding (``tests/test_encoders.py``).
"""
from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import machine, machine_line, write_json  # noqa: E402

import s2i.encoders.speech as speech  # noqa: E402
import s2i.encoders.text as text  # noqa: E402
from s2i.config import preset  # noqa: E402
from s2i.encoders.rnn import bidirectional  # noqa: E402


def step_seconds(module: torch.nn.Module, inputs: tuple, amp: bool, device: str, steps: int) -> float:
    """Median seconds of forward + backward over ``steps`` (after two warm-up steps)."""
    times = []
    for i in range(steps + 2):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            out = module(*inputs)
        out = out.embedding if hasattr(out, "embedding") else out
        out.float().pow(2).sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
        module.zero_grad(set_to_none=True)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.manual_seed(0)
    dev = args.device
    lengths = torch.randint(8, 26, (64,))
    ids = torch.randint(2, 60, (64, int(lengths.max())))
    ids[torch.arange(ids.shape[1])[None, :] >= lengths[:, None]] = 0
    model_cfg, _ = preset("resdavenet_vq_small")
    tcfg = model_cfg.text
    encoder = text.TextEncoder(80, model_cfg.embed_dim, token_dim=tcfg.embed_dim, hidden_size=256,
                               num_layers=tcfg.num_layers, rnn_type=tcfg.rnn_type)
    cases = {"text encoder": (text, encoder.to(dev), (ids.to(dev), lengths.to(dev)))}
    frames = torch.randint(150, 501, (64,))
    model_cfg, _ = preset("rnn_small")
    enc = speech.build_speech_encoder(model_cfg.speech, model_cfg.embed_dim).to(dev)
    audio = torch.randn(64, int(frames.max()), 39, device=dev)
    cases["rnn_small speech encoder"] = (speech, enc, (audio, frames.to(dev)))
    rows = []
    for name, (where, module, inputs) in cases.items():
        module.train()
        for amp in ([True, False] if dev == "cpu" else [False, True]):
            row = {"module": name, "bf16_autocast": amp}
            for packed in (True, False):
                where.bidirectional = functools.partial(bidirectional, packed=packed)
                row["packed_s" if packed else "one_way_s"] = step_seconds(module, inputs, amp, dev, args.steps)
            where.bidirectional = bidirectional
            row["speedup"] = row["packed_s"] / row["one_way_s"]
            rows.append(row)
            print(f"{name:26s} {'bf16' if amp else 'fp32'}: packed {row['packed_s'] * 1e3:7.1f} ms, "
                  f"one-way passes {row['one_way_s'] * 1e3:7.1f} ms  ({row['speedup']:.2f}x)", flush=True)
    m = machine()
    print(machine_line(m))
    if args.json:
        write_json(args.json, {"machine": m, "device": dev, "rows": rows})


if __name__ == "__main__":
    main()
