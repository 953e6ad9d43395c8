"""Train a speech <-> image model.

    python -m s2i train rnn_small                                  # a preset (see s2i/config.py)
    python -m s2i train rnn_small lr=5e-4 epochs=8 data=data/my-corpus
    python -m s2i train rnn_small model.speech.vq_positions=0110 model.speech.vq_sizes=[0,64,256,0]
    python -m s2i train my_run.yaml                                 # YAML: {preset: ..., model: {...}, <train keys>}
    python -m s2i train rnn_small out_dir=runs/x --resume           # continue runs/x exactly where it stopped
    python -m s2i train rnn_small epochs=20 budget_minutes=40       # as many epochs as fit in 40 min, LR decayed by then

Plain ``key=value`` overrides set :class:`s2i.config.TrainConfig` fields; ``model.<key>=value`` set
:class:`s2i.config.ModelConfig` fields. A run folder ``out_dir`` receives ``last/`` (a checkpoint
written every epoch, and on SIGTERM / Ctrl-C after finishing the current step), ``best/`` (the model
with the best validation score, the mean R@1/5/10 of speech <-> image, loadable with ``s2i.load``), ``metrics.jsonl``
(one JSON object per line: training lines ``{"step", "epoch", "loss", "lr", "vq/<layer>/perplexity",
...}`` and validation lines ``{"epoch", "step", "val": {...}}``) and TensorBoard logs in ``tb/``.
``--resume`` continues from ``last/`` and ends with the same weights as an uninterrupted run (same
device and number of processes; with waveform augmentation in DataLoader workers, the noise drawn
after a mid-epoch resume differs). Watch a run with ``tensorboard --logdir runs``.

Distributed data parallel (DDP): launch one process per GPU with torchrun; nothing else changes::

    torchrun --nproc_per_node=8 -m s2i train rnn_small batch_size=512
    # two machines with 8 GPUs each: run on each, with --node_rank 0 and 1
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST0 --master_port=29500 \\
        -m s2i train rnn_small batch_size=1024

``batch_size`` is the *global* batch. Every process builds the same global batches and embeds its
own slice; embeddings are gathered so that the in-batch loss sees the whole global batch (contrastive
losses depend on the negatives in the batch), and each process back-propagates only through its own
rows. The encoders' gradients are then summed across processes (the temperature's, which every process
has in full, averaged), so a DDP run takes the same steps as one process with the same batch size (up to
float rounding). VQ layers all-reduce their codebook statistics
themselves; BatchNorm statistics stay per process (averaged before validation and checkpoints).
CPU processes use the gloo backend, GPUs NCCL.

Read top to bottom: helpers (schedules, batches, distributed plumbing), then :func:`train`, then the CLI.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from s2i import checkpoint
from s2i.config import ConfigError, ModelConfig, TrainConfig, apply_overrides, from_dict, preset, to_dict
from s2i.datasets.augment import FeatureAugment, ImageAugment, from_spec
from s2i.datasets.corpus import BucketBatchSampler, PairedDataset, RandomBatchSampler, collate, similar_images
from s2i.evaluate import mean_r10, model_folder, retrieval_scores, selection_score
from s2i.losses import build_loss
from s2i.encoders.text import Tokenizer
from s2i.files import write_text
from s2i.model import build_model, load_matching, read_weights

log = logging.getLogger(__name__)

DEFAULT_PRESET = "rnn_small"
SCHEDULES = ("cyclic", "cosine", "constant")


# ---------------------------------------------------------------------------------------------
# learning-rate schedules (pure functions of the step; the "scheduler state" is the step itself)
# ---------------------------------------------------------------------------------------------
def cyclic_cosine(step: int, min_lr: float, max_lr: float, cycle_steps: int) -> float:
    """The seed's cyclic cosine: starts at ``min_lr``, peaks at mid-cycle, back to ``min_lr`` after
    ``cycle_steps``; repeats. ``(max-min) * (cos(pi * (1 + 2 t / cycle)) + 1) / 2 + min``."""
    t = step % cycle_steps
    return (max_lr - min_lr) * 0.5 * (math.cos(math.pi * (1 + 2 * t / cycle_steps)) + 1) + min_lr


def warmup_cosine(step: int, min_lr: float, max_lr: float, warmup_steps: int, total_steps: int,
                  time_progress: float = 0.0) -> float:
    """Linear warm-up from 0 to ``max_lr`` over ``warmup_steps``, then a cosine decay to ``min_lr``.

    The decay's progress is the further of the steps' and ``time_progress`` (the spent fraction of a
    wall-clock budget), so a run on a slow machine still ends at ``min_lr``.
    """
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    progress = min(1.0, max((step - warmup_steps) / max(1, total_steps - warmup_steps), time_progress))
    return min_lr + (max_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_at(step: int, cfg: TrainConfig, steps_per_epoch: int, time_progress: float = 0.0) -> float:
    """The learning rate of optimiser step ``step`` (0-based) for ``cfg.schedule``; ``time_progress``:
    the spent fraction of ``cfg.budget_minutes`` (the cosine schedule follows it when it is ahead).

    The cyclic cycle length is ``cycle_epochs`` x the real number of batches per epoch (the seed
    computed it from ``int(n / batch)``, so its cycles drifted against the epochs).
    """
    if cfg.schedule == "cyclic":
        return cyclic_cosine(step, cfg.min_lr, cfg.lr, max(1, round(cfg.cycle_epochs * steps_per_epoch)))
    if cfg.schedule == "cosine":
        return warmup_cosine(step, cfg.min_lr, cfg.lr, cfg.warmup_steps, cfg.epochs * steps_per_epoch, time_progress)
    if cfg.schedule == "constant":
        return cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
    raise ConfigError(f"unknown schedule {cfg.schedule!r}; choose from {list(SCHEDULES)}")


# ---------------------------------------------------------------------------------------------
# batches
# ---------------------------------------------------------------------------------------------
def global_batches(dataset: PairedDataset, cfg: TrainConfig, epoch: int, world: int = 1,
                   neighbours: np.ndarray | None = None) -> list[list[int]]:
    """This epoch's global batches (lists of utterance indices), identical in every process.

    ``bucket=True``: length-bucketed batches (little padding); otherwise the seed's batching:
    a random permutation cut into consecutive batches (lengths mixed, padded to the longest).
    ``neighbours`` (:func:`similar_images` of the split): ``cfg.hard_negatives`` of the utterances
    bring a caption of a similar image into their batch.
    Batches of one utterance are dropped (no negatives: nothing to learn), and under DDP batches
    smaller than the number of processes (a process cannot embed an empty slice).
    """
    kind = BucketBatchSampler if cfg.bucket else RandomBatchSampler
    hard = neighbours is not None and cfg.hard_negatives > 0
    sampler = kind(dataset.lengths, cfg.batch_size, shuffle=True, seed=cfg.seed,
                   caption_image=dataset.caption_image if cfg.one_caption_per_image or hard else None,
                   neighbours=neighbours if hard else None, hard_fraction=cfg.hard_negatives)
    sampler.set_epoch(epoch)
    return [b for b in sampler.global_batches() if len(b) >= max(2, world)]


def split_batch(batch: list[int], world: int) -> list[list[int]]:
    """Cut a global batch into ``world`` contiguous slices whose sizes differ by at most one."""
    return [part.tolist() for part in np.array_split(np.asarray(batch, dtype=np.int64), world)]


# ---------------------------------------------------------------------------------------------
# distributed plumbing (all no-ops in a single process)
# ---------------------------------------------------------------------------------------------
def setup_distributed(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    """Join the torchrun process group if there is one; return (rank, world size, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
        if device.type == "cuda" and world > 1:
            device = torch.device(f"cuda:{local_rank}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        # a long timeout: the other processes wait while process 0 validates
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=2))
    return rank, world, device


def gather_rows(x: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
    """Concatenate every process's rows of ``x`` in rank order; only this process's rows keep their
    gradient (the others' gradients are computed by their own processes)."""
    if len(sizes) == 1:
        return x
    buf = x.new_zeros((max(sizes), *x.shape[1:]))
    buf[: x.shape[0]] = x.detach()
    parts = [torch.empty_like(buf) for _ in sizes]
    dist.all_gather(parts, buf)
    parts = [p[:n] for p, n in zip(parts, sizes)]
    parts[rank] = x
    return torch.cat(parts)


def sum_gradients(params: list[torch.nn.Parameter], complete: tuple[torch.nn.Parameter, ...] = ()) -> None:
    """Combine the gradients of all processes with one flat all-reduce.

    Each process computed the whole global-batch loss but back-propagated only through its own rows,
    so encoder gradients are partial and are summed. Parameters in ``complete`` enter the loss itself
    (the InfoNCE temperature): every process already has their full gradient, so they are averaged.
    Parameters without a gradient this step have none in any process and stay untouched.
    """
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in with_grad])
    dist.all_reduce(flat)
    offset = 0
    world = dist.get_world_size()
    for p in with_grad:
        n = p.numel()
        grad = flat[offset:offset + n].view_as(p.grad)
        p.grad.copy_(grad / world if any(p is c for c in complete) else grad)
        offset += n


def average_buffers(model: torch.nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running statistics) across processes."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    for buf in model.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf)
            buf /= dist.get_world_size()


def max_over_processes(value: float, device: torch.device) -> float:
    """The largest ``value`` of all processes (so that every process uses the same number)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([float(value)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def any_process(flag: bool, device: torch.device) -> bool:
    """True if ``flag`` is true in any process (so every process stops at the same step)."""
    return bool(max_over_processes(float(flag), device))


# ---------------------------------------------------------------------------------------------
# stopping gracefully
# ---------------------------------------------------------------------------------------------
class StopRequest:
    """Turns SIGTERM and the first Ctrl-C into a request to stop after the current step (with a
    checkpoint); a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self.signal: str | None = None  # "SIGTERM" | "SIGINT" once one arrived
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal = signal.Signals(signum).name
        log.warning("%s received: stopping after this step and writing a checkpoint", self.signal)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------
# model set-up
# ---------------------------------------------------------------------------------------------
def with_text_vocab(model_cfg: ModelConfig, dataset: PairedDataset) -> ModelConfig:
    """Fill an empty text vocabulary from the training captions (it is stored in the model config)."""
    if model_cfg.text is None or model_cfg.text.vocab:
        return model_cfg
    vocab = Tokenizer.from_texts([u["text"] for u in dataset.utterances], level=model_cfg.text.arch).vocab
    return dataclasses.replace(model_cfg, text=dataclasses.replace(model_cfg.text, vocab=list(vocab)))


def _teacher(cfg: TrainConfig, features: str, device: torch.device) -> torch.nn.Module | None:
    """The frozen ``init_from`` model whose speech embeddings ``distill_weight`` pulls towards (or None)."""
    if cfg.distill_weight <= 0:
        return None
    if not cfg.init_from:
        raise ConfigError("distill_weight > 0 distils the init_from model into this one: set init_from too")
    from s2i.model import load

    teacher = load(model_folder(cfg.init_from), device=device)
    if teacher.config.speech.features != features:
        raise ConfigError(f"distill_weight: the init_from model reads {teacher.config.speech.features!r} features, "
                          f"this one {features!r}; both must hear the same input")
    teacher.eval()  # BatchNorm running statistics, no jitter, no updates
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def freeze(model: torch.nn.Module, parts: tuple[str, ...]) -> list[torch.nn.Module]:
    """Stop the gradient updates of the named parts (``TrainConfig.frozen_parts``); returns their modules,
    which the loop keeps in eval mode so that their BatchNorm statistics stay fixed too."""
    frozen = []
    for name in parts:
        part = getattr(model, name, None)
        if part is None:
            raise ConfigError(f"freeze: this model has no {name!r} part")
        part.requires_grad_(False)
        if isinstance(part, torch.nn.Module):
            frozen.append(part)
    return frozen


def set_seed(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the metric lines logged after ``step`` (after the checkpoint a run resumes from; all
    of them for a fresh run), so that metrics.jsonl tells one consistent history."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line torn by a kill or a full disk
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    write_text(path, "".join(line + "\n" for line in kept))  # never a half-rewritten history


# ---------------------------------------------------------------------------------------------
# the training run
# ---------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    model: Path  # best/ (or last/ when there was no validation): a model folder for s2i.load
    finished: bool  # every epoch trained
    stopped_by: str | None = None  # "SIGTERM" | "SIGINT" | "max_steps" | "max_minutes" when it stopped early


def train(cfg: TrainConfig, model_cfg: ModelConfig, resume: bool = False) -> Path:
    """Train ``model_cfg`` with ``cfg``; return the folder of the best model (``s2i.load``-able).

    ``resume=True`` continues from ``cfg.out_dir/last`` if it exists (its stored model config wins).
    Stops early, with a checkpoint, on SIGTERM / Ctrl-C, after ``cfg.max_steps`` steps or after
    ``cfg.max_minutes`` of training (a wall-clock budget, e.g. to compare recipes at equal cost).
    ``cfg.budget_minutes`` instead *finishes* the run after that much training: the cosine schedule
    follows the spent fraction of the budget, and the last (partial) epoch is validated.
    """
    return run(cfg, model_cfg, resume).model


def run(cfg: TrainConfig, model_cfg: ModelConfig, resume: bool = False) -> RunResult:
    """:func:`train`, also saying whether the run finished or why it stopped."""

    if cfg.schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {cfg.schedule!r}; choose from {list(SCHEDULES)}")
    if cfg.image_augment and cfg.image_input != "pixels":
        raise ConfigError(f"image_augment jitters pixels; this run's images are {cfg.image_input!r} features "
                          "(leave image_augment empty)")
    rank, world, device = setup_distributed(cfg)
    main = rank == 0
    out = Path(cfg.out_dir)
    last_dir, best_dir, metrics_path = out / "last", out / "best", out / "metrics.jsonl"

    # -- resume: the stored state decides the model and where to continue -----------------------
    state: dict[str, Any] | None = None
    has_checkpoint = last_dir.exists() or last_dir.with_name("last.old").exists()
    if resume and has_checkpoint:
        state = checkpoint.load(last_dir)
        model_cfg = from_dict(ModelConfig, state["model_config"])
        changed = sorted(k for k, v in to_dict(cfg).items() if state["train_config"].get(k) != v)
        if changed:
            log.info("resuming with changed settings: %s", ", ".join(
                f"{k}={getattr(cfg, k)!r} (was {state['train_config'].get(k)!r})" for k in changed))
        if state.get("world_size", 1) != world:
            log.warning("resuming a %d-process run with %d processes: batches and results will differ",
                        state.get("world_size", 1), world)
    elif has_checkpoint:
        raise ConfigError(f"{out} already holds a run; continue it with --resume (resume=True), "
                          "or give another out_dir")
    elif resume:
        log.warning("--resume: no checkpoint in %s, starting afresh", out)

    # -- determinism ---------------------------------------------------------------------------
    set_seed(cfg.seed)  # identical initial weights in every process
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    use_amp = cfg.amp if device.type == "cuda" else cfg.cpu_amp

    # -- data ----------------------------------------------------------------------------------
    features = model_cfg.speech.features
    train_set = PairedDataset(cfg.data, "train", features=features, image_input=cfg.image_input,
                              augment=from_spec(cfg.augment) if cfg.augment else None, max_frames=cfg.max_frames)
    val_set = PairedDataset(cfg.data, "val", features=features, image_input=cfg.image_input,
                            max_frames=cfg.max_frames) if cfg.eval_every > 0 else None
    neighbours = similar_images([r["text"] for r in train_set.utterances], train_set.caption_image,
                                cfg.hard_negative_k) if cfg.hard_negatives > 0 else None
    steps_per_epoch = len(global_batches(train_set, cfg, 0, world, neighbours))

    # -- model, optimiser, loss ----------------------------------------------------------------
    if state is None:
        model_cfg = with_text_vocab(model_cfg, train_set)
    model = build_model(model_cfg).to(device)
    if state is not None:
        model.load_state_dict(read_weights(checkpoint.resolve(last_dir), device=device))
    elif cfg.init_from:
        # warm start (e.g. VQ {} -> {3}): matching weights are copied, new VQ layers start by k-means
        load_matching(model, read_weights(model_folder(cfg.init_from), device=device))
    frozen = freeze(model, cfg.frozen_parts)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"freeze={cfg.freeze!r} leaves nothing to train")
    feature_augment = FeatureAugment(cfg.feature_augment, features).to(device) if cfg.feature_augment else None
    image_augment = ImageAugment(cfg.image_augment).to(device) if cfg.image_augment else None
    if cfg.optimizer != "adam":
        raise ConfigError(f"optimizer {cfg.optimizer!r} is not supported; use adam (the seed found SGD 'terrible')")
    optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_rng = torch.Generator(device=device).manual_seed(cfg.seed)  # shared by all processes
    loss_fn = build_loss(cfg.loss, margin=cfg.margin, hardest_n=cfg.hardest_n, generator=loss_rng)
    use_text = cfg.text_loss_weight > 0 or cfg.speech_text_loss_weight > 0
    if use_text and model_cfg.text is None:
        raise ConfigError("text_loss_weight > 0 or speech_text_loss_weight > 0 needs a model with a text encoder (model.text)")
    logit_scale = getattr(model, "logit_scale", None)
    teacher = _teacher(cfg, features, device)

    epoch, batch_in_epoch, step, best = 0, 0, 0, -1.0
    elapsed_before = 0.0  # training wall time of earlier processes of this run (before a resume)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        loss_rng.set_state(state["loss_rng"].to(loss_rng.get_state().device))
        epoch, batch_in_epoch, step, best = state["epoch"], state["batch"], state["step"], state["best"]
        elapsed_before = float(state.get("elapsed_s", 0.0))
        if main:
            checkpoint.set_rng_state(state["rng"])
        log.info("resumed %s at epoch %d, batch %d (step %d)", out, epoch, batch_in_epoch, step)
    if world > 1:
        # the other processes draw their own dropout / jitter noise; after a resume it is not
        # bitwise the uninterrupted run's (only process 0's RNG state is stored)
        if rank > 0:
            set_seed(cfg.seed + 7919 * rank + step)
        for p in model.parameters():
            dist.broadcast(p.data, src=0)

    writer = None
    if main:
        out.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(metrics_path, step if state is not None else -1)
        (out / "train_config.json").write_text(json.dumps({"train": to_dict(cfg), "model": to_dict(model_cfg)},
                                                          indent=2))
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tb"))
        n_params = sum(p.numel() for p in params)
        log.info("model %s: %.2fM trainable parameters; %d train utterances, %d batches/epoch of %d on %s x%d",
                 model_cfg.name, n_params / 1e6, len(train_set), steps_per_epoch, cfg.batch_size, device, world)

    def save_last(finished_epoch: bool) -> None:
        average_buffers(model)
        if not main:
            return
        training_state = {
            "format": 1, "model_config": to_dict(model_cfg), "train_config": to_dict(cfg),
            "optimizer": optimizer.state_dict(), "rng": checkpoint.rng_state(), "loss_rng": loss_rng.get_state(),
            "epoch": epoch + 1 if finished_epoch else epoch, "batch": 0 if finished_epoch else batch_in_epoch,
            "step": step, "best": best, "world_size": world, "elapsed_s": elapsed(),
        }
        checkpoint.save(last_dir, training_state, model=model, extra=model_extra())

    def model_extra(val: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"data": str(Path(cfg.data).resolve()), "epoch": epoch, "step": step, "val": val,
                "train_config": to_dict(cfg)}

    t_start = time.perf_counter()

    def elapsed() -> float:
        """Wall seconds of training so far, across resumes: what 'time to reach R@10 0.9' is measured in."""
        return elapsed_before + time.perf_counter() - t_start

    def budget_progress() -> float:
        """The spent fraction of ``cfg.budget_minutes`` (0 without one), the same in every process."""
        return max_over_processes(elapsed() / (60 * cfg.budget_minutes), device) if cfg.budget_minutes > 0 else 0.0

    # -- the loop ------------------------------------------------------------------------------
    stop = StopRequest()
    interrupted = out_of_time = False
    progress = budget_progress()
    with stop:
        while epoch < cfg.epochs and not interrupted and progress < 1:
            model.train()
            for part in frozen:
                part.eval()
            batches = global_batches(train_set, cfg, epoch, world, neighbours)
            mine = [split_batch(b, world)[rank] for b in batches]
            loader = torch.utils.data.DataLoader(
                train_set, batch_sampler=mine[batch_in_epoch:], collate_fn=collate, num_workers=cfg.workers,
                pin_memory=device.type == "cuda", persistent_workers=False,
                generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch))  # keeps the global RNG untouched
            bar = tqdm(loader, total=len(batches), initial=batch_in_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       disable=not main, dynamic_ncols=True, mininterval=1.0)
            window: dict[str, float] = {}
            window_n, t_window, utts = 0, time.perf_counter(), 0
            for batch in bar:
                global_idx = batches[batch_in_epoch]
                sizes = [len(s) for s in split_batch(global_idx, world)]
                image_ids = train_set.caption_image[torch.as_tensor(global_idx)].to(device)
                lr = lr_at(step, cfg, steps_per_epoch, progress)
                for group in optimizer.param_groups:
                    group["lr"] = lr

                audio = batch["audio"].to(device, non_blocking=True)
                lengths = batch["audio_lengths"].to(device, non_blocking=True)
                image = batch["image"].to(device, non_blocking=True)
                # each process adds its share of the VQ loss, weighted by its share of the frames
                frame_share = float(lengths.sum()) / float(train_set.lengths[global_idx].sum()) if world > 1 else 1.0
                if feature_augment is not None:
                    audio, lengths = feature_augment(audio, lengths)
                if image_augment is not None:
                    image = image_augment(image)
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                    speech = model.encode_speech_features(audio, lengths)
                    img = model.encode_image(image)
                    txt = model.encode_text(batch["text"]) if use_text else None
                img_all = gather_rows(img.float(), sizes, rank)
                cap_all = gather_rows(speech.embedding.float(), sizes, rank)
                retrieval = loss_fn(img_all, cap_all, image_ids, logit_scale)
                loss = retrieval + speech.vq_loss.float() * frame_share
                text_loss = speech_text_loss = distill_loss = None
                if teacher is not None:
                    with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                        target = teacher.encode_speech_features(audio, lengths).embedding
                    # cosine distance to where the teacher puts the same caption, averaged over the global
                    # batch (each process sums its own rows; their gradients are summed like the rest)
                    cosine = (target.float() * speech.embedding.float()).sum(-1)
                    distill_loss = (1 - cosine).sum() / sum(sizes)
                    loss = loss + cfg.distill_weight * distill_loss
                if use_text:
                    txt_all = gather_rows(txt.float(), sizes, rank)
                    if cfg.text_loss_weight > 0:
                        text_loss = loss_fn(img_all, txt_all, image_ids, logit_scale)
                        loss = loss + cfg.text_loss_weight * text_loss
                    if cfg.speech_text_loss_weight > 0:
                        # the transcript's embedding stands in for the image: same loss, same positives
                        speech_text_loss = loss_fn(txt_all, cap_all, image_ids, logit_scale)
                        loss = loss + cfg.speech_text_loss_weight * speech_text_loss

                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if world > 1:
                    sum_gradients(params, complete=(logit_scale,))
                grad_norm = (torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip > 0 else None)
                optimizer.step()
                step += 1
                batch_in_epoch += 1
                utts += len(global_idx)

                # -- logging: averages over the last log_every steps ----------------------------
                vals = {"loss": loss.detach().item(), "retrieval_loss": retrieval.detach().item(), "vq_loss": speech.vq_loss.detach().item()}
                if text_loss is not None:
                    vals["text_loss"] = text_loss.detach().item()
                if speech_text_loss is not None:
                    vals["speech_text_loss"] = speech_text_loss.detach().item()
                if distill_loss is not None:
                    vals["distill_loss"] = distill_loss.detach().item()
                if grad_norm is not None:
                    vals["grad_norm"] = float(grad_norm)
                for layer, stats in speech.vq_stats.items():
                    for name, v in stats.items():
                        vals[f"vq/{layer}/{name}"] = float(v)
                for k, v in vals.items():
                    window[k] = window.get(k, 0.0) + v
                window_n += 1
                if main and (step % cfg.log_every == 0 or batch_in_epoch == len(batches)):
                    now = time.perf_counter()
                    record = {"step": step, "epoch": epoch + batch_in_epoch / len(batches), "lr": lr,
                              **{k: v / window_n for k, v in window.items()},
                              "utt_per_s": utts / max(now - t_window, 1e-9), "elapsed_s": round(elapsed(), 3)}
                    _jsonl(metrics_path, record)
                    if writer is not None:
                        for k, v in record.items():
                            if k not in ("step", "epoch"):
                                writer.add_scalar(f"train/{k}", v, step)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
                    window, window_n, t_window, utts = {}, 0, now, 0

                progress = budget_progress()
                if progress >= 1:  # the budget is spent: the run ends here, validated like a last epoch
                    break
                out_of_time = cfg.max_minutes > 0 and elapsed() >= 60 * cfg.max_minutes
                if any_process(stop.requested or (cfg.max_steps > 0 and step >= cfg.max_steps) or out_of_time, device):
                    interrupted = batch_in_epoch < len(batches) or epoch + 1 < cfg.epochs
                    break
            bar.close()

            if batch_in_epoch < len(batches) and progress < 1:  # stopped mid-epoch
                save_last(finished_epoch=False)
                break

            # -- end of epoch: validate, keep the best, checkpoint ------------------------------
            val = None
            if val_set is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs
                                     or progress >= 1):
                average_buffers(model)
                if main:
                    val = retrieval_scores(model, val_set, batch_size=cfg.eval_batch_size,
                                           max_images=cfg.val_max_images, amp=use_amp)
                    val["mean_R@10"], val["score"] = mean_r10(val), selection_score(val)
                    _jsonl(metrics_path, {"epoch": epoch + 1, "step": step, "val": val, "elapsed_s": round(elapsed(), 3)})
                    if writer is not None:
                        for direction, scores in val.items():
                            if isinstance(scores, dict):
                                for k, v in scores.items():
                                    writer.add_scalar(f"val/{direction}/{k}", v, step)
                    log.info("epoch %d: val %s", epoch + 1, _summary(val))
                    if val["score"] >= best:  # ties go to the later epoch
                        best = val["score"]
                        checkpoint.save(best_dir, None, model=model, extra=model_extra(val))
                        log.info("new best validation score %.4f: saved %s", best, best_dir)
            save_last(finished_epoch=True)
            epoch += 1
            batch_in_epoch = 0

    if writer is not None:
        writer.close()
    if interrupted and main:
        log.warning("stopped at epoch %d, step %d; continue with --resume (out_dir=%s)", epoch + 1, step, out)
    if dist.is_initialized():
        dist.barrier()
    stopped_by = (stop.signal or ("max_minutes" if out_of_time else "max_steps")) if interrupted else None
    if main:
        _jsonl(metrics_path, {"event": "stopped" if interrupted else "finished", "epoch": epoch, "step": step,
                              **({"reason": stopped_by} if stopped_by else {}),
                              **({"budget_spent": True} if progress >= 1 and not interrupted else {})})
    return RunResult(best_dir if best_dir.exists() else checkpoint.resolve(last_dir), not interrupted, stopped_by)


def _summary(val: dict[str, Any]) -> str:
    parts = []
    for direction in ("speech_to_image", "image_to_speech", "text_to_image", "image_to_text"):
        if direction in val:
            parts.append(f"{direction} R@1/5/10 " + "/".join(f"{100 * val[direction][f'R@{k}']:.1f}" for k in (1, 5, 10)))
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# configuration from the command line
# ---------------------------------------------------------------------------------------------
def _dotted(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"speech": {"vq_positions": "01"}}`` -> ``{"speech.vq_positions": "01"}`` (partial sections)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_dotted(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def build_configs(config: str | None, overrides: list[str]) -> tuple[TrainConfig, ModelConfig]:
    """(TrainConfig, ModelConfig) from a preset name or YAML file plus ``key=value`` overrides."""
    train_items: dict[str, Any] = {}
    model_items: dict[str, Any] = {}
    name = config or DEFAULT_PRESET
    if config and (config.endswith((".yaml", ".yml")) or os.path.sep in config):
        import yaml

        path = Path(config)
        if not path.is_file():
            raise ConfigError(f"config file {config} not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:  # syntax errors, and tags like !!python/... that safe_load refuses
            raise ConfigError(f"{config} is not a valid YAML config: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{config}: expected a mapping of training keys (plus 'preset' and 'model')")
        name = data.pop("preset", DEFAULT_PRESET)
        model_items.update(_dotted(data.pop("model", {}) or {}))
        train_items.update(data)
    try:
        model_cfg, preset_train = preset(name)
    except KeyError as exc:
        raise ConfigError(exc.args[0]) from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        if key.startswith("model."):
            model_items[key[len("model."):]] = value
        else:
            train_items[key] = value
    cfg = apply_overrides(TrainConfig(), {**preset_train, **train_items})
    if "out_dir" not in train_items:
        cfg = dataclasses.replace(cfg, out_dir=f"runs/{model_cfg.name}")
    if model_items:
        model_cfg = apply_overrides(model_cfg, model_items)
    return cfg, model_cfg


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n", 1)[1].split("Read top to bottom")[0]
    parser.add_argument("config", nargs="?", help=f"preset name or YAML file (default: {DEFAULT_PRESET})")
    # REMAINDER, so that flags may also follow the overrides (`train rnn_small lr=1e-3 --resume`)
    parser.add_argument("overrides", nargs=argparse.REMAINDER,
                        help="key=value training overrides; model.<key>=value for the model")
    parser.add_argument("--resume", action="store_true", help="continue from OUT_DIR/last if it exists")


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config, overrides = args.config, [o for o in args.overrides if o != "--resume"]
    resume = args.resume or "--resume" in args.overrides
    if config and "=" in config:  # `train lr=1e-3`: no preset, just overrides
        config, overrides = None, [config, *overrides]
    cfg, model_cfg = build_configs(config, overrides)
    result = run(cfg, model_cfg, resume=resume)
    log.info("model: %s", result.model)
    if dist.is_initialized():
        dist.destroy_process_group()
    # stopped by SIGTERM / Ctrl-C: 130, as every interrupted s2i command (s2i.cli), so that job
    # schedulers and the app see an unfinished run; finished or stopped at max_steps: 0
    return 130 if result.stopped_by in ("SIGTERM", "SIGINT") else 0
