"""The exported gallery: what the app searches, plays and plots, stored beside a checkpoint.

``python -m s2i export`` (``s2i/export.py``) computes it once; the app only reads it, so a user's click
never pays for embedding a corpus or fitting UMAP. Files, all inside one folder (the checkpoint's):

    gallery.safetensors   image_embeddings (N_img, D), speech_embeddings (N_cap, D) (float16 by default),
                          text_embeddings (N_cap, D) when the model reads text, caption_image (N_cap,),
                          layout.image / layout.speech / layout.text (n, 2): the 2-D UMAP layout,
                          codes.<vq layer> (sum of T_l,) + codes.<vq layer>.offsets (N_cap + 1,)
    gallery.json          {"format": "s2i-gallery", "version": 1, "corpus": ..., "split": ...,
                           "images": [{"image_id", "path", "scene", "thumb": [x, y, w, h]}],
                           "captions": [{"utt_id", "image_index", "text", "speaker", "audio", "clip", "words"}],
                           "thumbnails": {"file", "cell"}, "layout": {...}, "code_frame_shift_s": {...}}
    gallery_thumbs.jpg    every image as a small thumbnail, packed in one JPEG grid
    gallery_audio/        a subset of the captions as small Ogg/Opus clips (``caption["clip"]``)

Image and audio paths in ``gallery.json`` are relative to the corpus; when the corpus is present the
app uses the originals, otherwise the thumbnails and clips (a Space ships only the checkpoint folder).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from s2i.files import read_header, replace_file, write_text

log = logging.getLogger(__name__)

FORMAT = "s2i-gallery"
VERSION = 1
TENSORS_FILE = "gallery.safetensors"
JSON_FILE = "gallery.json"
THUMBS_FILE = "gallery_thumbs.jpg"
AUDIO_DIR = "gallery_audio"
MODALITIES = ("image", "speech", "text")


class GalleryError(ValueError):
    """A gallery folder is missing, incomplete or of another format."""


@dataclass
class Gallery:
    """An exported gallery, loaded (see the module docstring for the files)."""

    root: Path
    image_embeddings: torch.Tensor
    speech_embeddings: torch.Tensor
    caption_image: torch.Tensor
    images: list[dict[str, Any]]
    captions: list[dict[str, Any]]
    text_embeddings: torch.Tensor | None = None
    layout: dict[str, torch.Tensor] = field(default_factory=dict)
    codes: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # layer -> (codes, offsets)
    meta: dict[str, Any] = field(default_factory=dict)
    _thumbs: Image.Image | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ reading
    @classmethod
    def load(cls, root: str | Path, corpus: str | Path | None = None) -> "Gallery":
        """Read a gallery folder; ``corpus`` overrides where the originals are looked for."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        root = Path(root)
        if not (root / JSON_FILE).is_file() or not (root / TENSORS_FILE).is_file():
            raise GalleryError(
                f"no exported gallery in {root} (needs {JSON_FILE} and {TENSORS_FILE}); make one with "
                f"`python -m s2i export {root} --data CORPUS --split test`")
        meta = read_header(root / JSON_FILE, FORMAT, VERSION, GalleryError, "gallery")
        try:
            tensors = load_file(str(root / TENSORS_FILE))
        except (SafetensorError, OSError, ValueError) as exc:
            raise GalleryError(f"{root / TENSORS_FILE} is truncated or corrupt ({exc}); re-export the gallery with "
                               f"`python -m s2i export {root} --data CORPUS --split test`") from None
        try:
            images, captions = meta.pop("images"), meta.pop("captions")
            codes = {}
            for name in meta.get("code_frame_shift_s", {}):
                codes[name] = (tensors[f"codes.{name}"].long(), tensors[f"codes.{name}.offsets"].long())
            gallery = cls(
                root=root,
                image_embeddings=tensors["image_embeddings"].float(),
                speech_embeddings=tensors["speech_embeddings"].float(),
                text_embeddings=tensors["text_embeddings"].float() if "text_embeddings" in tensors else None,
                caption_image=tensors["caption_image"].long(),
                images=images,
                captions=captions,
                layout={m: tensors[f"layout.{m}"].float() for m in MODALITIES if f"layout.{m}" in tensors},
                codes=codes,
                meta=meta,
            )
        except KeyError as exc:
            raise GalleryError(f"{root}: the gallery lacks {exc}; re-export it") from None
        if corpus is not None:
            gallery.meta["corpus_dir"] = str(Path(corpus).resolve())
        else:
            gallery.meta["corpus_dir"] = gallery._find_corpus()
        if len(captions) != len(gallery.speech_embeddings) or len(images) != len(gallery.image_embeddings):
            raise GalleryError(f"{root}: {JSON_FILE} and {TENSORS_FILE} disagree on the number of items")
        return gallery

    def _find_corpus(self) -> str | None:
        """The corpus the gallery came from, if reachable (relative to the gallery first, then absolute)."""
        for candidate in (self.meta.get("corpus_relative"), self.meta.get("corpus")):
            if not candidate:
                continue
            path = (self.root / candidate) if not os.path.isabs(candidate) else Path(candidate)
            if (path / "corpus.json").is_file():
                return str(path.resolve())
        return None

    # ------------------------------------------------------------------ items
    @property
    def num_images(self) -> int:
        return len(self.images)

    @property
    def num_captions(self) -> int:
        return len(self.captions)

    @property
    def has_text(self) -> bool:
        return self.text_embeddings is not None

    def _corpus_file(self, kind: str, relative: str | None) -> Path | None:
        corpus = self.meta.get("corpus_dir")
        if not corpus or not relative:
            return None
        root = self.meta.get(f"{kind}_root", kind)
        base = Path(root) if os.path.isabs(root) else Path(corpus) / root
        path = base / relative
        return path if path.is_file() else None

    def thumbnail(self, i: int) -> Image.Image:
        """Image ``i`` as its exported thumbnail."""
        if self._thumbs is None:
            self._thumbs = Image.open(self.root / self.meta["thumbnails"]["file"]).convert("RGB")
        x, y, w, h = self.images[i]["thumb"]
        return self._thumbs.crop((x, y, x + w, y + h))

    def image_path(self, i: int) -> Path | None:
        """The original file of image ``i`` when the corpus is present."""
        return self._corpus_file("image", self.images[i].get("path"))

    def image(self, i: int) -> Image.Image:
        """Image ``i``: the original if the corpus is present, else the thumbnail."""
        path = self.image_path(i)
        if path is not None:
            with Image.open(path) as im:
                return im.convert("RGB")
        return self.thumbnail(i)

    def audio_path(self, j: int) -> Path | None:
        """A playable file of caption ``j``: the corpus original, else its exported clip, else None."""
        path = self._corpus_file("audio", self.captions[j].get("audio"))
        if path is not None:
            return path
        clip = self.captions[j].get("clip")
        if clip and (self.root / clip).is_file():
            return self.root / clip
        return None

    def scene_attributes(self, i: int) -> dict[str, str]:
        """Image ``i``'s scene as flat ``name -> value`` strings, for colouring plots (see :func:`flatten_scene`)."""
        return flatten_scene(self.images[i].get("scene") or {})

    def caption_record(self, j: int) -> dict[str, Any]:
        """Caption ``j``'s record with its image's scene under ``"scene"``: the fields a corpus's caption
        records have, for grouping captions as ``python -m s2i evaluate --by`` does."""
        caption = self.captions[j]
        return {**caption, "scene": self.images[caption["image_index"]].get("scene") or {}}

    def captions_of(self, i: int) -> list[int]:
        """Indices of the captions of image ``i``."""
        return torch.nonzero(self.caption_image == i).flatten().tolist()

    def caption_codes(self, layer: str, j: int) -> torch.Tensor:
        """The stored VQ codes of caption ``j`` in ``layer``."""
        codes, offsets = self.codes[layer]
        return codes[offsets[j]:offsets[j + 1]]

    def code_layers(self) -> list[str]:
        return sorted(self.codes)

    def frame_shift(self, layer: str) -> float:
        return float(self.meta["code_frame_shift_s"][layer])

    # ------------------------------------------------------------------ layout
    def embeddings(self, modality: str) -> torch.Tensor | None:
        return {"image": self.image_embeddings, "speech": self.speech_embeddings,
                "text": self.text_embeddings}[modality]

    def place(self, embedding: torch.Tensor, k: int = 10, temperature: float = 0.05) -> tuple[float, float]:
        """Where a new embedding falls on the stored 2-D layout, without running UMAP.

        A softmax(similarity / temperature)-weighted average of the layout positions of the ``k`` most
        similar stored points (all modalities): cheap, deterministic, and a stored point's own embedding
        lands on (or right beside) its own position.
        """
        if not self.layout:
            raise GalleryError(f"the gallery in {self.root} has no 2-D layout; re-export it")
        names = [m for m in MODALITIES if m in self.layout and self.embeddings(m) is not None]
        points = torch.cat([self.embeddings(m) for m in names])
        positions = torch.cat([self.layout[m] for m in names])
        query = torch.nn.functional.normalize(embedding.detach().float().reshape(1, -1), dim=-1)
        sim = (query @ points.T).flatten()
        top, idx = sim.topk(min(k, len(sim)))
        weights = torch.softmax(top / temperature, dim=0)
        x, y = (weights[:, None] * positions[idx]).sum(0).tolist()
        return x, y

    # ------------------------------------------------------------------ writing
    def save(self, root: str | Path | None = None, half: bool = True) -> Path:
        """Write ``gallery.safetensors`` + ``gallery.json`` (thumbnails and clips are written by export).

        ``half`` stores the embeddings as float16 (half the bytes; scores move by about 1e-3, rankings
        of distinct scores stay). They are read back as float32.
        """
        from safetensors.torch import save_file

        root = Path(root or self.root)
        root.mkdir(parents=True, exist_ok=True)
        dtype = torch.float16 if half else torch.float32
        tensors = {
            "image_embeddings": self.image_embeddings.to(dtype).contiguous(),
            "speech_embeddings": self.speech_embeddings.to(dtype).contiguous(),
            "caption_image": self.caption_image.long().contiguous(),
        }
        if self.text_embeddings is not None:
            tensors["text_embeddings"] = self.text_embeddings.to(dtype).contiguous()
        for m, xy in self.layout.items():
            tensors[f"layout.{m}"] = xy.float().contiguous()
        for name, (codes, offsets) in self.codes.items():
            top = int(codes.max()) if codes.numel() else 0
            small = codes.to(torch.int16 if top < 2**15 else torch.int32)
            tensors[f"codes.{name}"] = small.contiguous()
            tensors[f"codes.{name}.offsets"] = offsets.long().contiguous()
        meta = {k: v for k, v in self.meta.items() if k != "corpus_dir"}
        meta.update(format=FORMAT, version=VERSION, images=self.images, captions=self.captions)
        replace_file(root / TENSORS_FILE, lambda p: save_file(tensors, str(p)))
        write_text(root / JSON_FILE, json.dumps(meta, ensure_ascii=False))
        self.root = root
        return root


def flatten_scene(scene: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A corpus's free-form scene attributes as flat strings: nested keys dotted, lists counted and their
    first item kept, e.g. ``{"layout": "h", "objects": [{"colour": "red"}, ...]}`` ->
    ``{"layout": "h", "objects.count": "2", "objects.0.colour": "red"}``."""
    flat: dict[str, str] = {}
    for key, value in scene.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_scene(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            flat[f"{name}.count"] = str(len(value))
            if value and isinstance(value[0], dict):
                flat.update(flatten_scene(value[0], f"{name}.0."))
            elif value:
                flat[f"{name}.0"] = str(value[0])
        elif value is not None and value != "":
            flat[name] = str(value)
    return flat


def find_gallery(checkpoint_dir: str | Path) -> Path | None:
    """The folder holding a checkpoint's gallery, if it has one."""
    path = Path(checkpoint_dir)
    return path if (path / JSON_FILE).is_file() and (path / TENSORS_FILE).is_file() else None
