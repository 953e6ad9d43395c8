"""``python -m s2i prepare``: make the built-in corpus, or prepare a real one from its shipped layout.

    python -m s2i prepare synthetic ...                                   (see its --help)
    python -m s2i prepare flickr8k   --root ~/data/flickr8k   --out data/flickr8k
    python -m s2i prepare places     --root ~/data/places     --out data/places
    python -m s2i prepare spokencoco --root ~/data/SpokenCOCO --out data/spokencoco --karpathy dataset_coco.json

For a real corpus: read its metadata (``flickr8k`` / ``places`` / ``spokencoco`` modules), check
every audio and image file it names (decoded once, in parallel), write the manifest
(``corpus.json`` + ``<split>.jsonl`` pointing into the user's tree: no audio is copied), then build
the feature caches under ``OUT/cache``. Files that are missing or broken (a missing or empty wav,
a truncated wav, a line pointing nowhere, an image that fails to decode) are left out, logged and
listed by name with the reason in ``OUT/problems.json`` and counted in ``corpus.json``; they never
stop the run. Re-running resumes the caches where they stopped.
"""
from __future__ import annotations

import argparse
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from s2i.datasets.corpus import CorpusError, CorpusInfo, Manifest, write_corpus

logger = logging.getLogger(__name__)

REAL_CORPORA = {
    "flickr8k": "the Flickr8k Audio Caption Corpus (flickr_audio/ + Flicker8k_Dataset/ + Karpathy dataset.json)",
    "places": "Places Audio Captions (the *_2020.json split files, their images and wavs)",
    "spokencoco": "SpokenCOCO (SpokenCOCO_{train,val}.json + wavs/, MSCOCO 2014 images)",
}


# ---------------------------------------------------------------------------------------------
# Checking the files a manifest names
# ---------------------------------------------------------------------------------------------
def check_audio(path: str | os.PathLike) -> int:
    """Decode one audio file as training will; → its length in samples at 16 kHz.

    Raises :class:`CorpusError` naming the problem for a missing, empty, unreadable, truncated or
    silent file (s2i.audio's errors and warnings).
    """
    from s2i.audio import AudioError, AudioTruncatedWarning, SilentAudioWarning, load_audio

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            wave = load_audio(path, max_seconds=None)
        except AudioError as e:
            raise CorpusError(str(e)) from None
    for w in caught:
        if issubclass(w.category, AudioTruncatedWarning):
            raise CorpusError(f"truncated: {w.message}")
        if issubclass(w.category, SilentAudioWarning):
            raise CorpusError(f"silent: {w.message}")
    return int(wave.shape[0])


def check_image(path: str | os.PathLike) -> None:
    """Decode one image (at reduced scale where the format allows: fast); raise :class:`CorpusError` if it fails."""
    from s2i.encoders.image import ImageError, open_image

    try:
        open_image(path, draft=(64, 64))
    except ImageError as e:
        raise CorpusError(str(e)) from None


class _Check:
    """``check(paths[i])`` (picklable, for worker processes); a :class:`CorpusError` is the verdict."""

    def __init__(self, paths: list[str], check: Callable[[str], object]):
        self.paths, self.check = paths, check

    def __call__(self, i: int):
        return self.check(self.paths[i])


def _check_all(paths: list[str], check: Callable[[str], object], workers: int, desc: str) -> dict[str, object]:
    """path → result of ``check`` or a :class:`CorpusError` saying what is wrong, on ``workers`` processes
    (processes, not threads: the audio check reads warnings, whose capture is process-global)."""
    from s2i.datasets.cache import parallel_map

    results: dict[str, object] = {}
    for i, ok, result, _ in tqdm(parallel_map(_Check(paths, check), range(len(paths)), workers), total=len(paths),
                                 desc=desc, unit="file", dynamic_ncols=True):
        if not ok:  # "CorpusError: message" from the worker; keep the message
            result = CorpusError(result.split(": ", 1)[1] if result.startswith("CorpusError: ") else result)
        results[paths[i]] = result
    return results


def check_manifest(manifest: Manifest, workers: int = 4, max_frames: int = 2048) -> Manifest:
    """Decode every audio and image file of ``manifest``; leave out (and list as problems) the
    utterances whose audio or image is missing or broken; add ``num_samples`` to every record."""
    image_root, audio_root = Path(manifest.image_root), Path(manifest.audio_root)
    records = [r for rs in manifest.splits.values() for r in rs]
    start = time.time()
    audio = _check_all(sorted({str(audio_root / r["audio"]) for r in records}), check_audio, workers, "checking audio")
    images = _check_all(sorted({str(image_root / r["image"]) for r in records}), check_image, workers, "checking images")
    problems = list(manifest.problems)
    for table in (audio, images):
        for path, result in table.items():
            if isinstance(result, CorpusError):
                problems.append({"file": path, "reason": str(result)})
    splits, too_long = {}, 0
    for split, rs in manifest.splits.items():
        kept = []
        for r in rs:
            n = audio[str(audio_root / r["audio"])]
            if isinstance(n, CorpusError) or isinstance(images[str(image_root / r["image"])], CorpusError):
                continue
            kept.append({**r, "num_samples": n})
            too_long += n > (max_frames - 1) * 160 + 400
        splits[split] = kept
    left_out = len(records) - sum(len(v) for v in splits.values())
    if too_long:
        logger.warning("%d utterances are longer than %d frames (%.1f s): training cuts them to their first %d frames",
                       too_long, max_frames, max_frames / 100, max_frames)
    report = {**manifest.report, "checked": {"audio_files": len(audio), "image_files": len(images),
                                             "utterances_left_out": left_out, "longer_than_max_frames": too_long,
                                             "max_frames": max_frames, "seconds": round(time.time() - start, 1)}}
    return Manifest(manifest.name, splits, manifest.image_root, manifest.audio_root, problems, report)


# ---------------------------------------------------------------------------------------------
# The whole preparation of a real corpus
# ---------------------------------------------------------------------------------------------
def prepare_corpus(manifest: Manifest, out: str | os.PathLike, *, features: list[str] | tuple[str, ...] = ("mfcc", "fbank"),
                   image_features: list[str] | tuple[str, ...] = ("pixels",), image_size: int = 224,
                   image_weights: str | None = None, random_init: bool = False, workers: int = 4,
                   device: str = "cpu", max_frames: int = 2048, progress: bool = True) -> CorpusInfo:
    """Check a reader's manifest, write it to ``out``, build its caches; → the written corpus."""
    from s2i.datasets.cache import build_caches

    if any(name != "pixels" for name in image_features) and image_weights is None and not random_init:
        raise CorpusError(f"image features {[n for n in image_features if n != 'pixels']} need --image-weights PATH "
                          "(a local state-dict file; s2i downloads nothing)")
    manifest = check_manifest(manifest, workers=workers, max_frames=max_frames)
    if not any(manifest.splits.values()):
        raise CorpusError(f"no usable utterance found ({len(manifest.problems)} problems, e.g. "
                          f"{manifest.problems[:3]}); check the paths given")
    info = write_corpus(out, manifest)
    _log_problems(manifest.problems, Path(out) / "problems.json")
    for split, rs in manifest.splits.items():
        logger.info("%s %s: %d utterances, %d images", manifest.name, split, len(rs), len({r["image_id"] for r in rs}))
    if features or image_features:
        reports = build_caches(info.root, features=features, image_features=image_features, image_size=image_size,
                               image_weights=image_weights, random_init=random_init, workers=workers, device=device,
                               progress=progress)
        failed = [f for r in reports for f in r.failed]
        if failed:
            logger.warning("%d cache items failed (see cache/*/*/report.json): %s", len(failed),
                           ", ".join(f["file"] for f in failed[:10]))
    logger.info("prepared corpus written to %s", info.root)
    return info


def _log_problems(problems: list[dict], where: Path) -> None:
    if not problems:
        logger.info("no missing or broken files")
        return
    logger.warning("%d problems (all listed in %s):", len(problems), where)
    for p in problems[:20]:
        logger.warning("  %s: %s", p["file"], p["reason"])
    if len(problems) > 20:
        logger.warning("  ... and %d more", len(problems) - 20)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def _csv(value: str) -> list[str]:
    return [] if value.strip().lower() in ("", "none") else [v.strip() for v in value.split(",") if v.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="corpus", metavar="CORPUS")
    p = sub.add_parser("synthetic", help="make the built-in spoken-scenes corpus (offline TTS)")
    try:
        from s2i.datasets import synthetic
    except ModuleNotFoundError as e:
        if e.name != "s2i.datasets.synthetic":
            raise
        p.set_defaults(_run=None)
    else:
        synthetic.add_arguments(p)
        _add_cache_arguments(p, image_size=int(getattr(synthetic, "IMAGE_SIZE", 128)))
        p.set_defaults(_run=_run_synthetic, _synthetic_run=synthetic.run)
    for name, help_text in REAL_CORPORA.items():
        p = sub.add_parser(name, help=f"prepare {help_text}", description=f"Prepare {help_text}.")
        p.add_argument("--root", required=True, help="the folder the corpus was unpacked into")
        p.add_argument("--out", required=True, help="where to write the prepared corpus (manifest + caches)")
        if name in ("flickr8k", "spokencoco"):
            p.add_argument("--karpathy", default=None, help="Karpathy's split JSON (default: looked for under --root)")
        if name in ("places", "spokencoco"):
            p.add_argument("--image-root", default=None, help="folder the JSON's image paths start from")
            p.add_argument("--audio-root", default=None, help="folder the JSON's wav paths start from")
        _add_cache_arguments(p, image_size=224)
        p.add_argument("--max-frames", type=int, default=2048, help="warn about utterances longer than this")
        p.set_defaults(_run=_run_real)


def _add_cache_arguments(p: argparse.ArgumentParser, image_size: int) -> None:
    """The cache options, skipping any the parser already has (the synthetic generator's own)."""
    options = [
        ("--features", dict(default="mfcc,fbank", type=_csv,
                            help="speech-feature caches to build: mfcc, fbank, both (default) or none")),
        ("--image-features", dict(default="pixels", type=_csv,
                                  help="image caches: pixels and/or a backbone such as resnet152 (ten-crop mean, the "
                                       "seed's) or resnet152-center; none for no image cache (default: pixels)")),
        ("--image-weights", dict(default=None, help="state-dict file of the backbone (torch.save or .safetensors); "
                                                    "'random' = untrained weights, for tests only")),
        ("--image-size", dict(type=int, default=image_size,
                              help=f"pixel cache: shorter side resized + centre crop ({image_size})")),
        ("--workers", dict(type=int, default=min(8, os.cpu_count() or 1), help="parallel worker processes")),
        ("--device", dict(default="auto", help="device for image features: auto, cpu, cuda, cuda:N")),
    ]
    for flag, kwargs in options:
        if flag not in p._option_string_actions:  # argparse keeps no public list of its flags
            p.add_argument(flag, **kwargs)


def read_layout(args: argparse.Namespace) -> Manifest:
    """Run the reader of ``args.corpus`` on ``args.root``."""
    if args.corpus == "flickr8k":
        from s2i.datasets.flickr8k import read_flickr8k

        return read_flickr8k(args.root, karpathy=args.karpathy)
    if args.corpus == "places":
        from s2i.datasets.places import read_places

        return read_places(args.root, image_root=args.image_root, audio_root=args.audio_root)
    from s2i.datasets.spokencoco import read_spokencoco

    return read_spokencoco(args.root, karpathy=args.karpathy, image_root=args.image_root, audio_root=args.audio_root)


def _cache_options(args: argparse.Namespace) -> dict:
    import torch

    for name in args.features:
        if name not in ("mfcc", "fbank"):
            raise CorpusError(f"--features: unknown speech features {name!r}; use mfcc, fbank or none")
    random_init = args.image_weights == "random"
    return dict(features=args.features, image_features=args.image_features, image_size=args.image_size,
                image_weights=None if random_init else args.image_weights, random_init=random_init,
                workers=args.workers,
                device=("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)


def _run_synthetic(args: argparse.Namespace) -> int:
    """The generator writes the corpus (its own command); then its caches are built like any corpus's."""
    from s2i.datasets.cache import build_caches

    options = _cache_options(args)  # checked before the (long) generation
    code = int(args._synthetic_run(args) or 0)
    if code == 0 and (options["features"] or options["image_features"]):
        build_caches(args.out, **options)
    return code


def _run_real(args: argparse.Namespace) -> int:
    options = _cache_options(args)
    manifest = read_layout(args)
    prepare_corpus(manifest, args.out, max_frames=args.max_frames, **options)
    return 0


def main(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "corpus", None) is None:
        raise CorpusError("choose what to prepare: synthetic, " + ", ".join(REAL_CORPORA) +
                          " (python -m s2i prepare --help)")
    if args._run is None:
        raise CorpusError("the built-in corpus generator (s2i.datasets.synthetic) is not installed yet")
    return int(args._run(args) or 0)
