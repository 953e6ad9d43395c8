"""Training cost "on paper": epoch time and GPU-hours for the real corpora, from counted FLOPs.

    python bench/costs.py                                  # merkx2021_rnn, resdavenet_vq_small (+ FLOPs of harwath2020_resdavenet_vq)
    python bench/costs.py --mfu 0.3 --gpu a100 --json runs/bench/costs.json
    python bench/costs.py --cpu-utt-per-s merkx2021_rnn=1.2   # take a CPU rate from bench/train_throughput.py instead
    python bench/costs.py --reuse runs/bench/costs.json --mfu 0.1   # same counts and rates, other assumptions

What is MEASURED here, on this machine:
  * FLOPs of one training step (speech encoder + image encoder + loss, forward + backward) per
    utterance, counted with ``torch.utils.flop_counter.FlopCounterMode`` at two utterance lengths
    (cost is linear in length for these encoders: convolutions, RNNs, attention pooling) and
    extrapolated to each corpus's mean duration. oneDNN is switched off while counting, since the
    counter does not see its fused LSTM kernel (the same matmuls are then counted one by one).
  * CPU training throughput: utterances/s of full Adam steps at the preset's batch size (or
    ``--cpu-batch``) on equal-length utterances of ``--cpu-seconds`` (no padding: the compute rate).

What is DERIVED (assumptions stated in the output and in the JSON):
  * CPU epoch time = utterances x seconds per utterance, scaled by FLOPs to the corpus's duration.
  * GPU time per utterance = FLOPs / (peak bf16 dense FLOP/s x MFU); ``--mfu`` (model FLOP
    utilisation) is the assumption, 0.30 by default. Nothing was run on a GPU.
  * A step never takes less than ``--min-step-ms`` (15 ms by default: an eager PyTorch step of a
    few hundred kernel launches plus Adam); small models hit this floor, not the FLOP bound.
  * DDP over N GPUs: s2i splits each global batch over the N processes, so steps per epoch stay
    the same: epoch time = max(FLOP time / (N x scaling efficiency), steps x floor), with
    ``--ddp-efficiency`` 0.9 by default; GPU-hours = N x wall hours.
Not included: precomputing image features (the seed's ResNet-152 ten-crop pass, once per corpus),
feature extraction (cached), validation passes, data-loading stalls.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, machine_line, write_json  # noqa: E402
from s2i.config import preset  # noqa: E402
from s2i.losses import build_loss  # noqa: E402
from s2i.model import build_model  # noqa: E402

FRAMES_PER_SECOND = 100  # 10 ms feature frames
FEATURE_DIMS = {"mfcc": 39, "fbank": 40}

#: peak dense bf16 tensor FLOP/s (vendor data sheets, no sparsity)
GPUS = {"a100": ("NVIDIA A100 (SXM/PCIe)", 312e12), "h100": ("NVIDIA H100 SXM", 989e12),
        "v100": ("NVIDIA V100 (fp16)", 125e12)}


@dataclass
class Corpus:
    name: str
    utterances: int  # per training epoch
    mean_seconds: float
    note: str


#: sizes and mean durations as the issue states them (rounded; not measured here: no corpus is on this machine)
CORPORA = [
    Corpus("Flickr8k", 40_000, 4.3, "40k captions in all (train split 30k); mean ~4.3 s (assumed)"),
    Corpus("Places400k", 400_000, 8.0, "~400k captions; mean ~8 s (assumed)"),
    Corpus("SpokenCOCO", 600_000, 4.0, "~600k captions; mean ~4 s (assumed)"),
]


def make_batch(cfg, batch: int, frames: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, frames, FEATURE_DIMS[cfg.speech.features], generator=g)
    lengths = torch.full((batch,), frames, dtype=torch.long)
    if cfg.image.arch == "linear":
        image = torch.randn(batch, cfg.image.in_dim, generator=g)
    else:
        image = torch.rand(batch, 3, cfg.image.image_size, cfg.image.image_size, generator=g)
    return {"feats": feats, "lengths": lengths, "image": image, "image_ids": torch.arange(batch)}


class Trainer:
    """One preset's model, Adam and loss: ``step(batch)`` is one training step as s2i.train takes it."""

    def __init__(self, name: str, seed: int = 0):
        torch.manual_seed(seed)
        self.cfg, overrides = preset(name)
        self.cfg.text = None  # trained only with text_loss_weight > 0 (off in every preset)
        self.batch_size = int(overrides.get("batch_size", 32))
        self.epochs = int(overrides.get("epochs", 32))
        self.model = build_model(self.cfg).train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=float(overrides.get("lr", 2e-4)))
        self.loss_fn = build_loss(overrides.get("loss", "hinge"), margin=overrides.get("margin"))

    def step(self, b: dict, update: bool = True) -> None:
        speech = self.model.encode_speech_features(b["feats"], b["lengths"])
        img = self.model.encode_image(b["image"])
        loss = self.loss_fn(img, speech.embedding, b["image_ids"], self.model.logit_scale) + speech.vq_loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if update:
            self.optimizer.step()

    def speech_params(self) -> int:
        return sum(p.numel() for p in self.model.speech.parameters())

    def image_params(self) -> int:
        return sum(p.numel() for p in self.model.image.parameters())


def count_flops(trainer: Trainer, seconds: float, batch: int = 2) -> float:
    """FLOPs of one forward + backward per utterance of ``seconds`` (optimizer step excluded)."""
    from torch.utils.flop_counter import FlopCounterMode

    b = make_batch(trainer.cfg, batch, int(round(seconds * FRAMES_PER_SECOND)))
    with torch.backends.mkldnn.flags(enabled=False), FlopCounterMode(display=False) as counter:
        trainer.step(b, update=False)
    return counter.get_total_flops() / batch


def flops_line(trainer: Trainer, s1: float = 1.0, s2: float = 2.0) -> tuple[float, float]:
    """(fixed, per-second) FLOPs per utterance: cost(s) = fixed + per_second * s.

    ``fixed`` holds the image encoder and the loss, less the frames a strided front end drops at
    an utterance's end (so it can be slightly negative for an RNN with a cheap image side)."""
    f1, f2 = count_flops(trainer, s1), count_flops(trainer, s2)
    per_second = (f2 - f1) / (s2 - s1)
    return f1 - per_second * s1, per_second


def measure_cpu(trainer: Trainer, seconds: float, batch: int, steps: int) -> dict:
    b = make_batch(trainer.cfg, batch, int(round(seconds * FRAMES_PER_SECOND)), seed=1)
    trainer.step(b)  # warm-up (allocations, k-means init of VQ codebooks)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        trainer.step(b)
        times.append(time.perf_counter() - t)
    best = min(times)
    return {"batch": batch, "seconds": seconds, "steps": steps, "step_s": times, "best_step_s": best,
            "utt_per_s": batch / best}


def hours(x: float) -> str:
    return f"{x * 3600:.0f} s" if x < 1 / 60 else f"{x * 60:.0f} min" if x < 1 else f"{x:.1f} h" if x < 48 else f"{x / 24:.1f} d"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="merkx2021_rnn,resdavenet_vq_small",
                   help="presets measured on the CPU and costed (default merkx2021_rnn,resdavenet_vq_small)")
    p.add_argument("--flops-only", default="harwath2020_resdavenet_vq",
                   help="presets whose FLOPs are counted and GPU cost derived, without a CPU measurement")
    p.add_argument("--cpu-seconds", type=float, default=4.3, help="utterance length for the CPU measurement (s)")
    p.add_argument("--cpu-batch", default="", help="batch per preset for the CPU measurement, e.g. merkx2021_rnn=8 "
                   "(default: the preset's own batch size)")
    p.add_argument("--cpu-steps", type=int, default=3, help="timed steps per preset after one warm-up (best is used)")
    p.add_argument("--cpu-utt-per-s", default="", help="take these CPU rates (at --cpu-seconds) instead of measuring, "
                   "e.g. merkx2021_rnn=1.3,resdavenet_vq_small=40")
    p.add_argument("--reuse", default="", help="take FLOPs and CPU rates from an earlier --json output instead of "
                   "counting and measuring again (to re-derive under other assumptions)")
    p.add_argument("--remeasure", action="store_true", help="with --reuse: measure the CPU again (FLOPs reused)")
    p.add_argument("--gpu", default="a100", choices=sorted(GPUS), help="GPU whose peak the derivation uses")
    p.add_argument("--mfu", type=float, default=0.30, help="assumed model FLOP utilisation on the GPU (default 0.30)")
    p.add_argument("--min-step-ms", type=float, default=15.0,
                   help="assumed floor on a GPU training step's time, ms (default 15)")
    p.add_argument("--ddp", type=int, default=8, help="GPUs in the DDP column (default 8)")
    p.add_argument("--ddp-efficiency", type=float, default=0.9, help="assumed DDP scaling efficiency (default 0.9)")
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    args = p.parse_args(argv)

    def pairs(text: str) -> dict[str, float]:
        return {k: float(v) for k, v in (item.split("=") for item in text.split(",") if item)}

    cpu_batch, given_rates = pairs(args.cpu_batch), pairs(args.cpu_utt_per_s)
    measured = [n for n in args.presets.split(",") if n]
    flops_only = [n for n in args.flops_only.split(",") if n and n not in measured]
    gpu_name, peak = GPUS[args.gpu]
    effective = peak * args.mfu
    print(machine_line(), flush=True)
    print(f"GPU assumption: {gpu_name}, {peak / 1e12:.0f} TFLOP/s bf16 dense peak x MFU {args.mfu:.2f} = "
          f"{effective / 1e12:.0f} TFLOP/s effective; DDP x{args.ddp} at {args.ddp_efficiency:.0%} scaling efficiency",
          flush=True)

    results: dict = {"machine": machine(), "command": "python bench/costs.py " + " ".join(sys.argv[1:] if argv is None else argv),
                     "assumptions": {"gpu": gpu_name, "peak_flops": peak, "mfu": args.mfu, "ddp_gpus": args.ddp,
                                     "ddp_efficiency": args.ddp_efficiency, "min_step_ms": args.min_step_ms,
                                     "corpora": [c.__dict__ for c in CORPORA]},
                     "presets": {}}
    earlier = json.loads(Path(args.reuse).read_text())["presets"] if args.reuse else {}
    for name in measured + flops_only:
        t0 = time.perf_counter()
        trainer = Trainer(name)
        if name in earlier:
            old = earlier[name]
            fixed, per_second = old["flops_per_utt_fixed"], old["flops_per_utt_per_second"]
            if name in measured and "cpu" in old and name not in given_rates and not args.remeasure:
                given_rates[name] = old["cpu"]["utt_per_s"]
        else:
            fixed, per_second = flops_line(trainer)
        entry = {"speech_params": trainer.speech_params(), "image_params": trainer.image_params(),
                 "epochs": trainer.epochs, "batch_size": trainer.batch_size,
                 "flops_per_utt_fixed": fixed, "flops_per_utt_per_second": per_second,
                 "flops_source": f"reused from {args.reuse}" if name in earlier else "counted",
                 "flops_counted_in_s": round(time.perf_counter() - t0, 1)}
        print(f"\n{name}: speech {entry['speech_params'] / 1e6:.1f}M + image {entry['image_params'] / 1e6:.1f}M params; "
              f"train step FLOPs per utterance ({entry['flops_source']}) = {fixed / 1e9:.2f} G + {per_second / 1e9:.2f} G per "
              f"second of speech ({(fixed + per_second * args.cpu_seconds) / 1e9:.1f} G at {args.cpu_seconds} s)", flush=True)
        cpu = None
        if name in measured:
            if name in given_rates:
                cpu = {"utt_per_s": given_rates[name], "seconds": args.cpu_seconds,
                       "source": f"reused from {args.reuse}" if name in earlier and not args.remeasure else "--cpu-utt-per-s"}
            else:
                batch = int(cpu_batch.get(name, trainer.batch_size))
                cpu = measure_cpu(trainer, args.cpu_seconds, batch, args.cpu_steps)
                cpu["source"] = "measured"
            cpu_flops = (fixed + per_second * args.cpu_seconds) * cpu["utt_per_s"]
            cpu["achieved_gflops"] = cpu_flops / 1e9
            entry["cpu"] = cpu
            print(f"  CPU ({cpu['source']}): {cpu['utt_per_s']:.3g} utt/s at {args.cpu_seconds} s"
                  + (f", batch {cpu['batch']}, best of {cpu['steps']} steps {cpu['best_step_s']:.2f} s"
                     if cpu["source"] == "measured" else "")
                  + f" = {cpu_flops / 1e9:.1f} GFLOP/s achieved", flush=True)
        rows = []
        for c in CORPORA:
            f = fixed + per_second * c.mean_seconds
            row = {"corpus": c.name, "utterances": c.utterances, "mean_seconds": c.mean_seconds,
                   "flops_per_utt": f, "epoch_flops": f * c.utterances}
            floor_h = math.ceil(c.utterances / trainer.batch_size) * args.min_step_ms / 1000 / 3600
            flop_h = f * c.utterances / effective / 3600
            row["gpu1_epoch_h"] = gpu_epoch_h = max(flop_h, floor_h)
            row["ddp_epoch_h"] = max(flop_h / (args.ddp * args.ddp_efficiency), floor_h)
            row["bound"] = "FLOPs" if flop_h / (args.ddp * args.ddp_efficiency) >= floor_h else (
                "step floor (DDP)" if flop_h >= floor_h else "step floor")
            row["gpu_hours_per_epoch_ddp"] = row["ddp_epoch_h"] * args.ddp
            row["gpu_hours_full_run_1gpu"] = gpu_epoch_h * trainer.epochs
            row["gpu_hours_full_run_ddp"] = row["gpu_hours_per_epoch_ddp"] * trainer.epochs
            if cpu is not None:
                row["cpu_epoch_h"] = c.utterances * f / cpu_flops / 3600
            rows.append(row)
        entry["corpora"] = rows
        results["presets"][name] = entry
        print(f"  {'corpus':11s} {'utts':>7s} {'mean s':>6s} {'TFLOP/utt':>9s} | {'CPU epoch':>10s} | "
              f"{'1 GPU epoch':>11s} {'DDP x' + str(args.ddp) + ' epoch':>12s} | {trainer.epochs} epochs: "
              f"{'GPU-h (1 GPU)':>13s} {'GPU-h (DDP)':>11s} {'wall (DDP)':>10s}  bound")
        for r in rows:
            print(f"  {r['corpus']:11s} {r['utterances']:7d} {r['mean_seconds']:6.1f} {r['flops_per_utt'] / 1e12:9.3f} | "
                  f"{hours(r['cpu_epoch_h']) if 'cpu_epoch_h' in r else '-':>10s} | "
                  f"{hours(r['gpu1_epoch_h']):>11s} {hours(r['ddp_epoch_h']):>12s} | {'':{len(str(trainer.epochs)) + 8}s}"
                  f"{r['gpu_hours_full_run_1gpu']:13.2f} {r['gpu_hours_full_run_ddp']:11.2f} "
                  f"{hours(r['ddp_epoch_h'] * trainer.epochs):>10s}  {r['bound']}")
    print("\nmeasured: params, FLOPs per utterance (counted), CPU utt/s. derived: every epoch time and GPU-hour figure "
          f"(GPU: FLOPs / ({peak / 1e12:.0f} TFLOP/s x {args.mfu}), at least {args.min_step_ms:g} ms a step).")
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
