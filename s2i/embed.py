"""Embed audio files, images or texts with a checkpoint and save the vectors.

    python -m s2i embed runs/rnn_small/best --audio a.wav b.flac --out speech.safetensors
    python -m s2i embed runs/rnn_small/best --images *.png --out images.safetensors
    python -m s2i embed runs/rnn_small/best --text "a red circle" "two blue squares" --out text.safetensors

The output holds one tensor, ``embeddings`` ``(N, D)`` (L2-normalised, row i = input i), and in its
metadata ``kind`` (audio | images | text), ``inputs`` (a JSON list of the file names or texts) and
``checkpoint``. Read it with ``safetensors.torch.load_file`` / ``safe_open(...).metadata()``.
"""
from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

log = logging.getLogger(__name__)


@torch.no_grad()
def embed(model: torch.nn.Module, kind: str, inputs: Sequence[str], batch_size: int = 32,
          progress: bool = False) -> torch.Tensor:
    """``(N, D)`` embeddings of audio files, image files or texts (``kind``: audio | images | text)."""
    from s2i.audio import load_audio

    if kind not in ("audio", "images", "text"):
        raise ValueError(f"kind must be audio, images or text, not {kind!r}")
    if not inputs:
        raise ValueError(f"no {kind} given")
    chunks = []
    for start in tqdm(range(0, len(inputs), batch_size), desc=kind, disable=not progress):
        batch = list(inputs[start:start + batch_size])
        if kind == "audio":
            chunks.append(model.encode_speech([load_audio(path) for path in batch]))
        elif kind == "images":
            chunks.append(model.encode_image(batch))
        else:
            chunks.append(model.encode_text(batch))
    return torch.cat(chunks).float().cpu()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a model folder or a run folder (its best/ model)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--audio", nargs="+", metavar="FILE", help="audio files (any format soundfile reads)")
    what.add_argument("--images", nargs="+", metavar="FILE", help="image files")
    what.add_argument("--text", nargs="+", metavar="TEXT", help="captions to embed with the text encoder")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def main(args: argparse.Namespace) -> int:
    from s2i.evaluate import model_folder
    from s2i.model import load

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    kind, inputs = next((k, v) for k, v in (("audio", args.audio), ("images", args.images), ("text", args.text)) if v)
    if kind != "text":
        missing = [p for p in inputs if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} {kind} file(s) not found, e.g. {missing[0]}")
    folder = model_folder(args.checkpoint)
    model = load(folder, device=args.device)
    vectors = embed(model, kind, inputs, args.batch_size, progress=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"embeddings": vectors.contiguous()}, str(out),
              metadata={"kind": kind, "inputs": json.dumps(list(inputs)), "checkpoint": str(folder)})
    log.info("%d %s embeddings (%d-d) -> %s", len(inputs), kind, vectors.shape[1], out)
    return 0
