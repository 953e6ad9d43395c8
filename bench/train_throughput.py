"""Training throughput: utterances per second and peak memory per preset, with length-bucketed batches
(``BucketBatchSampler``) against the seed's batching (``RandomBatchSampler``: a shuffled order cut into
batches, each padded to its longest utterance).

    python bench/train_throughput.py                          # merkx2021_rnn (the seed's "rnn") + the small presets
    python bench/train_throughput.py --presets rnn_small --steps 20 --device cuda
    python bench/train_throughput.py --json bench/train_throughput.json
    python bench/train_throughput.py --presets resdavenet_vq_small --cpu-amp   # bf16 autocast on the CPU

What is timed is a full training step on a padded batch: speech and image forward, the preset's loss
(+ VQ loss), backward and Adam, with features and images already in memory (random values of the
right shapes; the loader's own cost is small next to the model's with memory-mapped caches). Then
each encoder's forward + backward alone on the same batches: where a step's time goes (the rest is
the loss, Adam and the VQ layers' bookkeeping).
Utterance lengths come from the built-in corpus's training split when ``data/synthetic-default`` has
been prepared, else from a documented stand-in: durations log-normal with median 4 s and sigma 0.35
(Flickr8k's spoken captions average about 4-5 s), cut to [1 s, 10.24 s], 100 frames per second.

Step time grows with the padded size ``B x T_max``, so the steps timed are batches spread evenly over
the epoch's range of ``T_max`` (quantiles); "epoch utt/s" extrapolates the measured time per padded
frame to every batch of one epoch, "measured utt/s" is the plain rate over the timed steps. Each
(preset, batching) runs in its own process so that its peak memory is its own: on a CPU the process's
peak resident set (``resource.getrusage``; tracemalloc does not see torch's allocator) and its growth
over the steps, on a GPU ``torch.cuda.max_memory_allocated``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from common import machine, machine_line, write_json  # noqa: E402
from s2i.config import preset  # noqa: E402
from s2i.datasets.corpus import BucketBatchSampler, RandomBatchSampler, padding_fraction  # noqa: E402

CORPUS = REPO / "data" / "synthetic-default"
SMALL = ["rnn_small", "rnn_vq_small", "resdavenet_vq_small"]
#: (warm-up steps, timed steps) where the default (1, 10) is too slow on a CPU: the full-size seed model
STEPS = {"merkx2021_rnn": (0, 2)}


def utterance_lengths(features: str, n: int = 4000, seed: int = 0) -> tuple[np.ndarray, str]:
    """Frames per training utterance: the built-in corpus's if prepared, else the stand-in."""
    if (CORPUS / "corpus.json").is_file():
        from s2i.datasets.corpus import PairedDataset

        ds = PairedDataset(CORPUS, "train", features=features)
        return ds.lengths.numpy(), f"{CORPUS.relative_to(REPO)} train ({len(ds)} utterances)"
    rng = np.random.default_rng(seed)
    seconds = np.clip(rng.lognormal(np.log(4.0), 0.35, n), 1.0, 10.24)
    return (seconds * 100).astype(np.int64), f"stand-in log-normal durations (median 4 s, {n} utterances)"


def run_one(name: str, batching: str, warmup: int, steps: int, device: str, batch_size: int | None,
            cpu_amp: bool = False) -> dict:
    """Time ``steps`` training steps of preset ``name`` (in this process) and measure its memory."""
    from s2i.losses import build_loss
    from s2i.model import build_model

    torch.manual_seed(0)
    model_cfg, train_over = preset(name)
    if model_cfg.text is not None:
        model_cfg.text.vocab = ["<pad>", "<unk>"]  # the text encoder takes no part in a speech step
    bs = batch_size or train_over.get("batch_size", 32)
    lengths, source = utterance_lengths(model_cfg.speech.features)
    kind = BucketBatchSampler if batching == "bucketed" else RandomBatchSampler
    epoch = [b for b in kind(lengths, bs, seed=0) if len(b) > 1]
    max_len = np.array([lengths[b].max() for b in epoch])
    timed = [epoch[i] for i in np.argsort(max_len)[np.linspace(0, len(epoch) - 1, steps).round().astype(int)]]

    dev = torch.device(device)
    amp = dev.type == "cuda" or cpu_amp  # as training: bf16 autocast on a GPU, on a CPU with cpu_amp
    model = build_model(model_cfg).to(dev).train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loss_fn = build_loss(train_over.get("loss", "hinge"), margin=train_over.get("margin"))
    feat_dim = model.features.dim
    img = model_cfg.image

    def batch(idx: list[int]) -> tuple[torch.Tensor, ...]:
        lens = torch.as_tensor(lengths[idx])
        audio = torch.randn(len(idx), int(lens.max()), feat_dim) * (torch.arange(int(lens.max()))[None, :, None] < lens[:, None, None])
        image = torch.rand(len(idx), img.in_dim) if img.arch == "linear" else torch.rand(len(idx), 3, img.image_size, img.image_size)
        return audio.to(dev), lens.to(dev), image.to(dev)

    def autocast() -> torch.autocast:
        return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp)

    def seconds_of(work) -> float:
        """Wall time of ``work()``, the GPU's queue drained before and after."""
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        work()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def step(audio: torch.Tensor, lens: torch.Tensor, image: torch.Tensor) -> None:
        with autocast():
            speech = model.encode_speech_features(audio, lens)
            images = model.encode_image(image)
        loss = loss_fn(images.float(), speech.embedding.float(), None, model.logit_scale) + speech.vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for idx in timed[:warmup]:  # warm-up: allocator, k-means initialisation of VQ codebooks
        step(*batch(idx))
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    seconds = 0.0
    for idx in timed:
        data = batch(idx)
        seconds += seconds_of(lambda: step(*data))
    # where a step's time goes: each encoder's forward + backward alone, on the same batches
    parts = {"speech": 0.0, "image": 0.0}
    for idx in timed:
        audio, lens, image = batch(idx)
        for part, run_part in (("speech", lambda: model.encode_speech_features(audio, lens).embedding),
                               ("image", lambda: model.encode_image(image))):
            def forward_backward() -> None:
                with autocast():
                    out = run_part()
                out.float().sum().backward()

            parts[part] += seconds_of(forward_backward)
            opt.zero_grad(set_to_none=True)
    padded_timed = sum(len(b) * int(lengths[b].max()) for b in timed)
    padded_epoch = sum(len(b) * int(lengths[b].max()) for b in epoch)
    epoch_seconds = seconds / padded_timed * padded_epoch
    result = {
        "preset": name, "batching": batching, "batch_size": bs, "steps": len(timed), "device": device,
        "lengths": source, "utterances_per_s": sum(map(len, timed)) / seconds,
        "epoch_utterances_per_s": sum(map(len, epoch)) / epoch_seconds,
        "padding_fraction": padding_fraction(epoch, lengths), "batches_per_epoch": len(epoch),
        "cpu_amp": cpu_amp, "step_s": seconds / len(timed), "speech_encoder_s": parts["speech"] / len(timed),
        "image_encoder_s": parts["image"] / len(timed),
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_growth_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before,
    }
    if dev.type == "cuda":
        result["peak_gpu_MB"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["merkx2021_rnn", *SMALL])
    parser.add_argument("--steps", type=int, default=None, help="timed steps per preset (default: 10; merkx2021_rnn 2)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: torch's). On a machine shared with other jobs use 1: "
                             "OpenMP threads that wait for each other at every RNN time step slow down many-fold")
    parser.add_argument("--batch-size", type=int, default=None, help="default: each preset's own")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cpu-amp", action="store_true", help="bf16 autocast on the CPU too (training's cpu_amp)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--one", nargs=2, metavar=("PRESET", "BATCHING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        name, batching = args.one
        warmup, steps = STEPS.get(name, (1, 10))
        if args.threads:
            torch.set_num_threads(args.threads)
        print(json.dumps(run_one(name, batching, warmup, args.steps or steps, args.device, args.batch_size,
                                 args.cpu_amp)))
        return 0

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine_line()}")
    results = []
    for name in args.presets:
        for batching in ("bucketed", "unbucketed"):
            cmd = [sys.executable, __file__, "--one", name, batching, "--device", args.device]
            if args.steps:
                cmd += ["--steps", str(args.steps)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            if args.batch_size:
                cmd += ["--batch-size", str(args.batch_size)]
            if args.cpu_amp:
                cmd += ["--cpu-amp"]
            env = dict(os.environ)
            if args.threads:  # before torch starts: torch.set_num_threads alone leaves OpenMP's pool in place
                env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print(f"{name} {batching}: failed\n{proc.stderr[-2000:]}")
                continue
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = results[-1]
            print(f"{name:<20} {batching:<11} batch {r['batch_size']:>3}  {r['epoch_utterances_per_s']:8.3g} utt/s (epoch)"
                  f"  {r['utterances_per_s']:8.3g} utt/s (measured, {r['steps']} steps)  padding {100 * r['padding_fraction']:4.1f}%"
                  f"  peak RSS {r['peak_rss_MB']:7.0f} MB (+{r['rss_growth_MB']:.0f})"
                  f"  step {r['step_s']:.3g} s = speech enc. {r['speech_encoder_s']:.3g} s + image enc. {r['image_encoder_s']:.3g} s + rest"
                  + (f"  peak GPU {r['peak_gpu_MB']:.0f} MB" if "peak_gpu_MB" in r else ""), flush=True)
    if results:
        print(f"lengths: {results[0]['lengths']}")
        for name in args.presets:
            pair = {r["batching"]: r for r in results if r["preset"] == name}
            if len(pair) == 2:
                gain = pair["bucketed"]["epoch_utterances_per_s"] / pair["unbucketed"]["epoch_utterances_per_s"]
                print(f"{name}: bucketing x{gain:.2f} utterances/s per epoch")
    if args.json:
        write_json(args.json, {"machine": machine(), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
