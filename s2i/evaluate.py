"""Evaluate retrieval on a split: embed every caption and image, then R@1/5/10, median and mean rank
in both directions (:func:`s2i.metrics.retrieval_metrics`), for speech and, where the model has a text
encoder, for typed text.

    python -m s2i evaluate runs/rnn_small/best --split test
    python -m s2i evaluate runs/rnn_small --split test --json              # a run folder: its best/ model
    python -m s2i evaluate ckpt_a --ensemble ckpt_b ckpt_c --split test    # ensemble of models
    python -m s2i evaluate ckpt --augment noise:10                         # robustness: noisy queries
    python -m s2i evaluate ckpt --by scene.layout                          # recall per group of captions
    python -m s2i evaluate ckpt --by 'speaker~^([^+]+)'                    # ... per accent (a regex group)

``--by`` breaks the caption -> image directions down by any field of the split's caption records
(a dotted path, e.g. ``speaker`` or ``scene.layout``), optionally through a regular expression
whose first group is the key: it shows *where* a model fails (which voices, which kinds of scene).

The default corpus is the one the checkpoint was trained on (stored in its ``config.json``), else
``data/synthetic-default``. An ensemble of models ranks by the mean of their cosine similarities
(:func:`combine`): each model compares a caption and an image in its own space. The seed's
``ensemble.py`` summed the models' embeddings instead (``--ensemble-mode embedding``), which adds
cross terms between one model's speech and another's images: harmless for cyclic-LR snapshots of one
run, whose spaces nearly agree, but not for independently trained models (the bundled model and one of
its recipe trained with foreign-accented voices too: speech -> image R@1 0.898 with similarities, 0.870
with the seed's sum, 0.867 and 0.863 alone).
"""
from __future__ import annotations

import argparse
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from s2i.datasets.augment import from_spec
from s2i.datasets.corpus import PairedDataset, collate
from s2i.metrics import caption_to_image_ranks, retrieval_metrics, summarize_ranks

log = logging.getLogger(__name__)

DEFAULT_DATA = "data/synthetic-default"
DIRECTIONS = ("speech_to_image", "image_to_speech", "text_to_image", "image_to_text")


class _Speech(Dataset):
    """The utterances of a split without their images (evaluation embeds each image once)."""

    def __init__(self, paired: PairedDataset):
        self.paired = paired

    def __len__(self) -> int:
        return len(self.paired)

    def __getitem__(self, i: int) -> dict[str, Any]:
        rec = self.paired.utterances[i]
        return {"audio": self.paired.audio(i), "image": torch.zeros(0), "image_index": int(self.paired.caption_image[i]),
                "utt_id": rec["utt_id"], "text": rec["text"], "index": i}


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def has_text(model: torch.nn.Module) -> bool:
    return getattr(model, "text", None) is not None


def kept_captions(dataset: PairedDataset, max_images: int = 0) -> Tensor:
    """Indices of the captions evaluated with ``max_images`` (> 0: those of the first N images only)."""
    keep = torch.arange(len(dataset))
    if 0 < max_images < dataset.num_images:
        keep = keep[dataset.caption_image < max_images]
    return keep


@torch.no_grad()
def embed_split(model: torch.nn.Module, dataset: PairedDataset, batch_size: int = 100, max_images: int = 0,
                workers: int = 0, amp: bool = False, progress: bool = False
                ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Embed a split: ``(speech (N, D), images (M, D), caption_image (N,), text (N, D) or None)``.

    Rows follow the dataset's order (captions) and ``image_ids`` order (images); ``caption_image[c]``
    is caption ``c``'s image. ``max_images > 0`` keeps the first images and their captions only.
    Speech is embedded in length-sorted batches (little padding; padding never changes a result).
    """
    was_training = model.training
    model.eval()
    device = _device_of(model)
    caption_image = dataset.caption_image
    keep = kept_captions(dataset, max_images)
    n_images = min(max_images, dataset.num_images) if max_images > 0 else dataset.num_images
    order = keep[torch.argsort(dataset.lengths[keep], stable=True)].tolist()
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda")

    rows, chunks = [], []
    loader = DataLoader(_Speech(dataset), batch_sampler=batches, collate_fn=collate, num_workers=workers)
    for batch in tqdm(loader, desc="speech", disable=not progress, leave=False):
        with autocast:
            out = model.encode_speech_features(batch["audio"].to(device), batch["audio_lengths"].to(device))
        rows.append(batch["index"])
        chunks.append(out.embedding.float().cpu())
    speech = torch.cat(chunks)[torch.argsort(torch.cat(rows))]  # back to dataset order (= keep's order)

    images = []
    image_loader = DataLoader(torch.utils.data.Subset(dataset.image_dataset(), range(n_images)),
                              batch_size=batch_size, num_workers=workers)
    for pixels in tqdm(image_loader, desc="images", disable=not progress, leave=False):
        with autocast:
            images.append(model.encode_image(pixels.to(device)).float().cpu())
    image_emb = torch.cat(images)

    text_emb = None
    if has_text(model):
        kept = [dataset.utterances[i]["text"] for i in keep.tolist()]
        chunks = []
        for i in range(0, len(kept), batch_size):
            with autocast:
                chunks.append(model.encode_text(kept[i:i + batch_size]).float().cpu())
        text_emb = torch.cat(chunks)
    model.train(was_training)
    return speech, image_emb, caption_image[keep], text_emb


def scores(speech: Tensor, images: Tensor, caption_image: Tensor, text: Tensor | None = None) -> dict[str, dict[str, float]]:
    """Retrieval metrics in both directions for speech (and text, when given) against images."""
    out = retrieval_metrics(speech @ images.T, caption_image, names=("speech", "image"))
    if text is not None:
        out.update(retrieval_metrics(text @ images.T, caption_image, names=("text", "image")))
    return out


def _field(value: Any, parts: list[str], by: str) -> str:
    """The value at ``parts`` inside a record; through a list, every element's value, joined by commas."""
    if isinstance(value, list) and parts:
        return ",".join(_field(v, parts, by) for v in value)
    if not parts:
        if isinstance(value, (dict, list)):
            raise ValueError(f"--by {by!r} names a {type(value).__name__}, not a value to group by; "
                             "name a field inside it")
        return str(value)
    if not isinstance(value, dict) or parts[0] not in value:
        have = ", ".join(sorted(value)) if isinstance(value, dict) else type(value).__name__
        raise ValueError(f"--by {by!r}: caption records have no field {parts[0]!r} here (have: {have})")
    return _field(value[parts[0]], parts[1:], by)


def group_key(record: dict[str, Any], by: str) -> str:
    """The group of one caption record for ``--by``: the value at a dotted field path (``scene.layout``;
    through a list, its elements' values joined by commas: ``scene.objects.kind`` -> ``"two,heart"``),
    or with ``FIELD~REGEX`` the regex's first group (whole match without groups) searched in it."""
    path, _, pattern = by.partition("~")
    text = _field(record, path.split("."), by)
    if not pattern:
        return text
    try:
        match = re.search(pattern, text)
    except re.error as e:
        raise ValueError(f"--by {by!r}: bad regular expression {pattern!r}: {e}") from None
    if match is None:
        return "(no match)"
    return match.group(1) if match.re.groups else match.group(0)


def breakdown(speech: Tensor, images: Tensor, caption_image: Tensor, text: Tensor | None,
              keys: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Caption -> image recall per group of captions (``keys[c]``: caption ``c``'s group, e.g. from
    :func:`group_key`): ``{group: {"captions": n, "speech_to_image": {...}, "text_to_image": {...}}}``.
    Each caption is ranked against the whole gallery, as in :func:`scores`; only the queries are grouped."""
    if len(keys) != len(caption_image):
        raise ValueError(f"{len(keys)} group keys for {len(caption_image)} captions")
    ranks = {"speech_to_image": caption_to_image_ranks(speech @ images.T, caption_image)}
    if text is not None:
        ranks["text_to_image"] = caption_to_image_ranks(text @ images.T, caption_image)
    groups: dict[str, dict[str, Any]] = {}
    for key in sorted(set(keys)):
        idx = torch.tensor([i for i, k in enumerate(keys) if k == key])
        groups[key] = {"captions": len(idx), **{d: summarize_ranks(r[idx]) for d, r in ranks.items()}}
    return groups


def mean_r10(result: dict[str, dict[str, float]]) -> float:
    """Mean of speech -> image and image -> speech R@10 (reported beside the selection score)."""
    return (result["speech_to_image"]["R@10"] + result["image_to_speech"]["R@10"]) / 2


def selection_score(result: dict[str, dict[str, float]]) -> float:
    """The model-selection metric: mean R@1, R@5 and R@10 of speech -> image and image -> speech.

    R@10 alone saturates (a validation split of 500 images reaches 1.0 within a few epochs, after
    which the first epoch to get there would be kept); R@1 keeps telling epochs apart.
    """
    return sum(result[d][f"R@{k}"] for d in ("speech_to_image", "image_to_speech") for k in (1, 5, 10)) / 6


def retrieval_scores(model: torch.nn.Module, dataset: PairedDataset, batch_size: int = 100, max_images: int = 0,
                     amp: bool = False, workers: int = 0) -> dict[str, Any]:
    """Embed ``dataset`` with ``model`` and score it: the validation step of training."""
    return scores(*embed_split(model, dataset, batch_size, max_images=max_images, amp=amp, workers=workers))


# ---------------------------------------------------------------------------------------------
# checkpoints on disk
# ---------------------------------------------------------------------------------------------
def model_folder(path: str | Path) -> Path:
    """A model folder for ``path``: itself, a run folder's ``best/`` (else ``last/``), or an installed
    model's folder for a name such as ``"default"`` (see ``s2i.model.available_models``)."""
    from s2i.model import CHECKPOINTS, available_models

    if not Path(path).exists() and str(path) in available_models():
        return CHECKPOINTS / str(path)
    path = Path(path)
    if (path / "config.json").is_file() or not path.is_dir():
        return path
    for name in ("best", "last"):
        if (path / name / "config.json").is_file():
            return path / name
    return path


def checkpoint_extra(path: str | Path) -> dict[str, Any]:
    """The ``extra`` section of a model folder's ``config.json`` ({} if none)."""
    config = Path(path) / "config.json"
    try:
        return dict(json.loads(config.read_text()).get("extra") or {})
    except (OSError, ValueError, AttributeError):
        return {}


def default_data(path: str | Path) -> str:
    """The corpus a checkpoint was trained on if it still exists, else the built-in corpus."""
    data = checkpoint_extra(path).get("data")
    if data and Path(data).is_dir():
        return str(data)
    return DEFAULT_DATA


ENSEMBLE_MODES = ("similarity", "embedding")


def _check_ensemble_mode(mode: str) -> None:
    if mode not in ENSEMBLE_MODES:
        raise ValueError(f"unknown ensemble mode {mode!r}; choose one of {', '.join(ENSEMBLE_MODES)}")


def combine(parts: Sequence[Sequence[Tensor | None]], mode: str = "similarity") -> list[Tensor | None]:
    """Several models' ``[speech, images, text]`` embeddings (text may be None) -> one set whose dot
    products rank as the ensemble does.

    ``"similarity"``: each model's L2-normalised embeddings side by side, over sqrt(number of models),
    so a caption-image dot product is the mean of the models' cosine similarities (and stays in
    [-1, 1]). ``"embedding"``: the seed's sum of the embeddings, not re-normalised.
    """
    _check_ensemble_mode(mode)
    out: list[Tensor | None] = []
    for kind in zip(*parts):
        if any(p is None for p in kind):
            out.append(None)
        elif mode == "embedding":
            out.append(torch.stack(list(kind)).sum(0))
        else:
            out.append(torch.cat(list(kind), dim=1) / len(kind) ** 0.5)
    return out


def evaluate(checkpoint_or_model: str | Path | torch.nn.Module, corpus: str | Path | None = None,
             split: str = "test", batch_size: int = 100, augment: str | None = None,
             ensemble: Sequence[str | Path | torch.nn.Module] = (), device: str = "cpu", max_images: int = 0,
             image_input: str | None = None, workers: int = 0, progress: bool = False,
             seed: int = 0, by: str | None = None, ensemble_mode: str = "similarity") -> dict[str, dict[str, Any]]:
    """R@1/5/10, median and mean rank of a model (or an ensemble, combined by :func:`combine`) on a split.

    Returns ``{"speech_to_image": {...}, "image_to_speech": {...}}`` plus ``text_to_image`` /
    ``image_to_text`` when every model has a text encoder. ``augment`` (e.g. ``"noise:10"``,
    ``"telephone"``) degrades the spoken captions before they are embedded (random draws seeded
    by ``seed``; with ``workers > 0`` each worker draws its own). ``by`` adds ``"by": {"field": by,
    "groups": ...}`` (:func:`breakdown`).
    """
    from s2i.model import load

    sources = [checkpoint_or_model, *ensemble]
    first = sources[0]
    folder = None if isinstance(first, torch.nn.Module) else model_folder(first)
    if corpus is None:
        corpus = default_data(folder) if folder is not None else DEFAULT_DATA
    if image_input is None:
        image_input = (checkpoint_extra(folder).get("train_config") or {}).get("image_input", "pixels") if folder else "pixels"
    augment_fn = from_spec(augment) if augment else None

    _check_ensemble_mode(ensemble_mode)  # before embedding anything, as combine() would only at the end
    datasets: dict[str, PairedDataset] = {}
    parts: list[list[Tensor | None]] = []
    caption_image = None
    keys: list[str] = []
    for source in sources:
        model = source if isinstance(source, torch.nn.Module) else load(model_folder(source), device=device)
        features = model.config.speech.features
        if features not in datasets:
            datasets[features] = PairedDataset(corpus, split, features=features, image_input=image_input,
                                               augment=augment_fn)
        if by and not keys:  # before embedding anything: a bad field fails at once
            dataset = datasets[features]
            keys = [group_key(dataset.utterances[i], by) for i in kept_captions(dataset, max_images).tolist()]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the same noise for every model and every run
            speech, images, caption_image, text = embed_split(model, datasets[features], batch_size,
                                                              max_images=max_images, workers=workers,
                                                              amp=device.startswith("cuda"), progress=progress)
        parts.append([speech, images, text])
    assert caption_image is not None
    total = combine(parts, ensemble_mode)
    result: dict[str, dict[str, Any]] = scores(total[0], total[1], caption_image, total[2])
    if by:
        result["by"] = {"field": by, "groups": breakdown(total[0], total[1], caption_image, total[2], keys)}
    return result


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def format_table(result: dict[str, dict[str, float]]) -> str:
    """A readable table: one row per direction, recalls in percent."""
    names = {"speech_to_image": "speech -> image", "image_to_speech": "image -> speech",
             "text_to_image": "text -> image", "image_to_text": "image -> text"}
    lines = [f"{'direction':<16}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'median':>8}{'mean':>8}"]
    for key in DIRECTIONS:
        if key in result:
            r = result[key]
            lines.append(f"{names[key]:<16}{100 * r['R@1']:>8.1f}{100 * r['R@5']:>8.1f}{100 * r['R@10']:>8.1f}"
                         f"{r['median_rank']:>8.0f}{r['mean_rank']:>8.1f}")
    return "\n".join(lines)


def format_groups(by: dict[str, Any]) -> str:
    """The ``--by`` breakdown as a table: one row per group, caption -> image recalls in percent."""
    groups = by["groups"]
    directions = [d for d in ("speech_to_image", "text_to_image") if d in next(iter(groups.values()), {})]
    width = max([len(by["field"])] + [len(g) for g in groups]) + 2
    head = "".join(f"{d.replace('_to_', ' -> ') + ' R@1/R@10':>26}" for d in directions)
    lines = [f"{by['field']:<{width}}{'captions':>9}{head}"]
    for name, g in groups.items():
        cells = "".join(f"{100 * g[d]['R@1']:>19.1f} /{100 * g[d]['R@10']:>5.1f}" for d in directions)
        lines.append(f"{name:<{width}}{g['captions']:>9}{cells}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a model folder (model.safetensors + config.json) or a run folder")
    parser.add_argument("--data", default=None, help="prepared corpus (default: the one the checkpoint was trained on, "
                                                     f"else {DEFAULT_DATA})")
    parser.add_argument("--split", default="test")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--augment", default=None, help="degrade the speech first, e.g. noise:10 or telephone")
    parser.add_argument("--ensemble", nargs="+", default=[], metavar="CHECKPOINT",
                        help="more checkpoints, ranked with the first by their mean similarity (--ensemble-mode)")
    parser.add_argument("--ensemble-mode", choices=ENSEMBLE_MODES, default="similarity",
                        help="similarity: the mean of the models' cosine similarities (default); embedding: "
                             "the seed's sum of the models' embeddings (for snapshots of one run)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--max-images", type=int, default=0, help="evaluate on the first N images only (0 = all)")
    parser.add_argument("--by", default=None, metavar="FIELD[~REGEX]",
                        help="also break caption -> image recall down by a field of the caption records, e.g. "
                             "speaker, scene.layout, or 'speaker~^([^+]+)' (the regex's first group: the accent)")
    parser.add_argument("--image-input", default=None, help="pixels or a cached image-feature name "
                                                            "(default: what the checkpoint was trained with)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=0)


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING if args.json else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    result = evaluate(args.checkpoint, args.data, args.split, args.batch_size, args.augment, args.ensemble,
                      device=args.device, max_images=args.max_images, image_input=args.image_input,
                      workers=args.workers, progress=not args.json, by=args.by, ensemble_mode=args.ensemble_mode)
    if args.json:
        print(json.dumps(result))
    else:
        data = args.data or default_data(model_folder(args.checkpoint))
        print(f"{model_folder(args.checkpoint)}{' + ensemble of ' + str(len(args.ensemble)) if args.ensemble else ''}"
              f" on {data} [{args.split}]{' augment ' + args.augment if args.augment else ''}")
        print(format_table(result))
        if "by" in result:
            print()
            print(format_groups(result["by"]))
    return 0
