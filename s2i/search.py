"""Nearest-neighbour search over L2-normalised embeddings (score = dot product), and the ``search`` CLI.

* :func:`search` — exact top-k by chunked matrix products: any size, any device, bounded memory.
* :class:`Index` — a gallery to query many times, optionally with ids. Below ``APPROX_THRESHOLD``
  vectors it searches exactly; from there on it builds an inverted-file index (IVF-flat, inner
  product, kept by faiss): the gallery is cut into ~sqrt(N) k-means cells and a query scans only
  the ``nprobe`` cells nearest to it (1/5 of them by default, within a latency budget). ``bench/search.py`` measures the
  speed and the recall@10 against exact search. Saved as ``index.json`` + ``index.safetensors``
  (+ ``index.faiss``), so it can sit beside a checkpoint.

CLI::

    python -m s2i search CHECKPOINT --audio q.wav              # the checkpoint's exported gallery
    python -m s2i search CHECKPOINT --gallery photos/ --text "a red circle" -k 5 --json
    python -m s2i search CHECKPOINT --gallery emb.safetensors --image x.png --target speech
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from s2i.files import read_header, replace_file, write_text

log = logging.getLogger(__name__)

#: galleries at least this large get the approximate (faiss IVF) index under ``method="auto"``
APPROX_THRESHOLD = 50_000
#: scores computed at once by the exact search (64 MB of float32)
CHUNK_ELEMENTS = 1 << 24
#: the default nprobe scans at most this many floats per query (256 MB: ~50 ms of memory traffic on 2 cores)
SCAN_BUDGET = 1 << 26
FORMAT = "s2i-index"
VERSION = 1
JSON_FILE, VECTORS_FILE, FAISS_FILE = "index.json", "index.safetensors", "index.faiss"
METHODS = ("auto", "exact", "ivf")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class SearchError(ValueError):
    """Queries and gallery do not fit together, or an index or gallery file cannot be used."""


def _as_matrix(x: Any, name: str) -> Tensor:
    x = torch.as_tensor(x)
    if x.dim() == 1:
        x = x[None]
    if x.dim() != 2 or x.shape[1] == 0:
        raise SearchError(f"{name} must be a (n, D) matrix of embeddings, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        x = x.float()
    return x


def search(queries: Tensor, gallery: Tensor, k: int = 5) -> tuple[Tensor, Tensor]:
    """Exact top-``k`` of each query by dot product.

    ``queries (Q, D)`` (or one ``(D,)`` vector), ``gallery (N, D)``. Returns ``scores (Q, k)`` in
    descending order and ``indices (Q, k)`` into the gallery; ``k`` is capped at ``N``. Runs on the
    tensors' device, in chunks of at most ``CHUNK_ELEMENTS`` scores.
    """
    queries, gallery = _as_matrix(queries, "queries"), _as_matrix(gallery, "gallery")
    if queries.shape[1] != gallery.shape[1]:
        raise SearchError(f"queries have dimension {queries.shape[1]} but the gallery {gallery.shape[1]}; "
                          "were they made by the same model?")
    if int(k) != k or k < 1:
        raise SearchError(f"k must be a positive integer, got {k}")
    n = gallery.shape[0]
    k = min(int(k), n)
    queries = queries.to(device=gallery.device, dtype=gallery.dtype)
    q_chunk = max(1, min(queries.shape[0], CHUNK_ELEMENTS // n))
    g_chunk = max(k, min(n, CHUNK_ELEMENTS // q_chunk))
    scores, indices = [], []
    for qs in range(0, queries.shape[0], q_chunk):
        q = queries[qs:qs + q_chunk]
        best_s = best_i = None
        for gs in range(0, n, g_chunk):
            s, i = (q @ gallery[gs:gs + g_chunk].T).topk(min(k, n - gs), dim=1)
            i += gs
            if best_s is not None:  # merge with the best so far
                s, order = torch.cat([best_s, s], 1).topk(k, dim=1)
                i = torch.cat([best_i, i], 1).gather(1, order)
            best_s, best_i = s, i
        scores.append(best_s)
        indices.append(best_i)
    return torch.cat(scores), torch.cat(indices)


def _import_faiss():
    try:
        import faiss
    except ImportError:
        raise SearchError("approximate search needs faiss: pip install faiss-cpu "
                          "(or build the index with method='exact')") from None
    return faiss


class Index:
    """A searchable gallery of embeddings, with optional ids (file names, utterance ids...).

    ``method``: ``"exact"`` (torch matrix products), ``"ivf"`` (faiss IVF-flat, approximate) or
    ``"auto"`` (``"ivf"`` from ``APPROX_THRESHOLD`` vectors on). ``nlist`` (k-means cells, default
    ``sqrt(N)``) and ``nprobe`` (cells scanned per query; default ``nlist / 5``, fewer if that would
    scan more than ``SCAN_BUDGET`` floats, at least 16; can be changed after building) trade speed
    for recall. Vectors are kept on the CPU as float32 (an IVF index holds a second copy in faiss).
    """

    def __init__(self, vectors: Tensor, ids: Sequence[Any] | None = None, method: str = "auto",
                 nlist: int | None = None, nprobe: int | None = None, seed: int = 0):
        vectors = _as_matrix(vectors, "gallery").detach().to("cpu", torch.float32).contiguous()
        if vectors.shape[0] == 0:
            raise SearchError("the gallery is empty")
        if ids is not None:
            ids = list(ids)
            if len(ids) != vectors.shape[0]:
                raise SearchError(f"{len(ids)} ids for {vectors.shape[0]} vectors")
        if method not in METHODS:
            raise SearchError(f"unknown index method {method!r}; choose from {list(METHODS)}")
        if method == "auto":
            method = "ivf" if vectors.shape[0] >= APPROX_THRESHOLD else "exact"
        self.vectors, self.ids, self.method = vectors, ids, method
        self.nlist = self._nprobe = self._faiss = None
        if method == "ivf":
            n = vectors.shape[0]
            self.nlist = int(nlist or max(1, round(math.sqrt(n))))
            self._faiss = self._build_ivf(seed)
            cell_floats = n / self.nlist * self.dim
            self.nprobe = nprobe or min(self.nlist, max(16, min(self.nlist // 5, int(SCAN_BUDGET // cell_floats))))

    def _build_ivf(self, seed: int):
        faiss = _import_faiss()
        from faiss.contrib.ivf_tools import add_preassigned

        n, dim = self.vectors.shape
        if not 1 <= self.nlist <= n:
            raise SearchError(f"nlist={self.nlist} cells for {n} vectors; use 1..{n} cells or method='exact'")
        # k-means and the assignment run on torch's BLAS (3x faster than faiss-cpu's on the
        # machines measured); faiss keeps the inverted lists and answers the queries
        generator = torch.Generator().manual_seed(seed)
        sample = self.vectors
        if n > 50 * self.nlist:  # ~50 points per cell place the cell centres well enough
            sample = sample[torch.randperm(n, generator=generator)[:50 * self.nlist]]
        log.info("k-means: %d cells on %d of %d vectors", self.nlist, len(sample), n)
        centroids = _spherical_kmeans(sample, self.nlist, iters=10, generator=generator)
        quantizer = faiss.IndexFlatIP(dim)
        quantizer.add(centroids.numpy())
        index = faiss.IndexIVFFlat(quantizer, dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
        cells = search(self.vectors, centroids, k=1)[1][:, 0]
        add_preassigned(index, self.vectors.numpy(), cells.numpy())
        return index

    @property
    def nprobe(self) -> int | None:
        """Cells an approximate index scans per query (``None`` for an exact index)."""
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int | None) -> None:
        if self._faiss is not None:
            if value is None or not 1 <= int(value) <= self.nlist:
                raise SearchError(f"nprobe must be in 1..{self.nlist}, got {value}")
            self._faiss.nprobe = int(value)
        self._nprobe = None if value is None else int(value)

    def __len__(self) -> int:
        return self.vectors.shape[0]

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def search(self, queries: Tensor, k: int = 5) -> tuple[Tensor, Tensor]:
        """Top-``k`` ``(scores, indices)`` of each query, as :func:`search` (CPU tensors)."""
        queries = _as_matrix(queries, "queries").detach().to("cpu", torch.float32)
        if queries.shape[1] != self.dim:
            raise SearchError(f"queries have dimension {queries.shape[1]} but the index {self.dim}; "
                              "were they made by the same model?")
        if self._faiss is None:
            return search(queries, self.vectors, k)
        if int(k) != k or k < 1:
            raise SearchError(f"k must be a positive integer, got {k}")
        k = min(int(k), len(self))
        scores, indices = self._faiss.search(np.ascontiguousarray(queries.numpy()), k)
        scores, indices = torch.from_numpy(scores), torch.from_numpy(indices)
        short = (indices < 0).any(1)  # the probed cells held fewer than k vectors: answer those exactly
        if short.any():
            scores[short], indices[short] = search(queries[short], self.vectors, k)
        return scores, indices

    def lookup(self, indices: Tensor) -> list:
        """The ids of gallery positions (the positions themselves when the index has no ids)."""
        flat = [int(i) for i in torch.as_tensor(indices).flatten()]
        return [self.ids[i] if self.ids is not None else i for i in flat]

    # -------------------------------------------------------------------------- files
    def save(self, directory: str | Path) -> Path:
        """Write ``index.json``, ``index.safetensors`` (and ``index.faiss``) into ``directory``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        replace_file(directory / VECTORS_FILE, lambda p: save_file({"vectors": self.vectors}, str(p)))
        if self._faiss is not None:
            replace_file(directory / FAISS_FILE, lambda p: _import_faiss().write_index(self._faiss, str(p)))
        meta = {"format": FORMAT, "version": VERSION, "method": self.method, "size": len(self), "dim": self.dim,
                "nlist": self.nlist, "nprobe": self.nprobe, "ids": self.ids}
        write_text(directory / JSON_FILE, json.dumps(meta, ensure_ascii=False))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "Index":
        """Read an index written by :meth:`save` (the faiss part is rebuilt if its file is missing)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / JSON_FILE).is_file() or not (directory / VECTORS_FILE).is_file():
            raise SearchError(f"no s2i index in {directory} (needs {JSON_FILE} and {VECTORS_FILE})")
        meta = read_header(directory / JSON_FILE, FORMAT, VERSION, SearchError, "index")
        missing = [key for key in ("method", "size", "dim", "nlist", "nprobe", "ids") if key not in meta]
        if missing:
            raise SearchError(f"{directory / JSON_FILE} lacks {missing}; save the index again")
        try:
            vectors = load_file(str(directory / VECTORS_FILE))["vectors"]
        except (SafetensorError, OSError, ValueError, KeyError) as exc:
            raise SearchError(f"{directory / VECTORS_FILE} is truncated or corrupt ({exc}); save the index again") \
                from None
        if tuple(vectors.shape) != (meta["size"], meta["dim"]):
            raise SearchError(f"{directory}: {VECTORS_FILE} holds {tuple(vectors.shape)}, "
                              f"{JSON_FILE} says ({meta['size']}, {meta['dim']})")
        faiss_file = directory / FAISS_FILE
        if meta["method"] == "ivf" and faiss_file.is_file():
            index = cls(vectors, meta["ids"], method="exact")  # cheap; the faiss part is read below
            index.method, index.nlist = "ivf", meta["nlist"]
            try:
                index._faiss = _import_faiss().read_index(str(faiss_file))
            except RuntimeError as exc:  # faiss reports a broken file as a RuntimeError
                raise SearchError(f"{faiss_file} is truncated or corrupt ({exc}); delete it to rebuild") from None
            if index._faiss.ntotal != len(vectors) or index._faiss.nlist != index.nlist:
                raise SearchError(f"{faiss_file} does not match {JSON_FILE} and {VECTORS_FILE}; delete it to rebuild")
            index.nprobe = meta["nprobe"]
            return index
        return cls(vectors, meta["ids"], method=meta["method"], nlist=meta["nlist"], nprobe=meta["nprobe"])


def _spherical_kmeans(x: Tensor, k: int, iters: int, generator: torch.Generator) -> Tensor:
    """``k`` unit-norm centres of unit vectors ``x`` by Lloyd steps on the dot product; an emptied
    cell restarts at a random point."""
    centres = x[torch.randperm(len(x), generator=generator)[:k]].clone()
    for _ in range(iters):
        cells = search(x, centres, k=1)[1][:, 0]
        sums = torch.zeros_like(centres).index_add_(0, cells, x)
        empty = torch.bincount(cells, minlength=k) == 0
        sums[empty] = x[torch.randint(len(x), (int(empty.sum()),), generator=generator)]
        centres = torch.nn.functional.normalize(sums, dim=1)
    return centres


# ------------------------------------------------------------------------------ CLI
def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="a checkpoint folder or a model name ('default')")
    query = parser.add_mutually_exclusive_group(required=True)
    query.add_argument("--audio", metavar="FILE", help="a spoken query (any format soundfile reads)")
    query.add_argument("--text", metavar="TEXT", help="a written query (models with a text encoder)")
    query.add_argument("--image", metavar="FILE", help="an image query (searches captions by default)")
    parser.add_argument("--gallery", metavar="PATH",
                        help="what to search: an exported gallery folder (default: the checkpoint's own), "
                             "a saved index folder, a .safetensors file of embeddings, or a folder of images")
    parser.add_argument("--target", choices=("image", "speech", "text"),
                        help="which embeddings of an exported gallery to search (default: image for "
                             "--audio/--text, speech for --image)")
    parser.add_argument("-k", type=int, default=5, help="how many results (default 5)")
    parser.add_argument("--save-index", metavar="DIR", help="also save the gallery's index here for reuse")
    parser.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")


def _embeddings_file(path: Path) -> tuple[Tensor, list | None]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys, metadata = list(f.keys()), f.metadata() or {}
            matrices = [key for key in keys if len(f.get_slice(key).get_shape()) == 2]
            key = "embeddings" if "embeddings" in keys else (matrices[0] if len(matrices) == 1 else None)
            if key is None:
                raise SearchError(f"{path} holds {keys}; name the gallery tensor 'embeddings' (N, D)")
            vectors = f.get_tensor(key)
    except (SafetensorError, OSError) as exc:
        raise SearchError(f"{path} is truncated or corrupt ({exc})") from None
    try:
        ids = json.loads(metadata["ids"]) if "ids" in metadata else None
    except json.JSONDecodeError as exc:
        raise SearchError(f"{path}: the metadata key 'ids' is not a JSON list ({exc})") from None
    return vectors, ids


def _image_folder(path: Path, model, batch_size: int = 32) -> tuple[Tensor, list[str]]:
    from tqdm import tqdm

    from s2i.encoders.image import open_image

    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise SearchError(f"{path} has no index, gallery, or image files ({', '.join(IMAGE_SUFFIXES)})")
    chunks = []
    with torch.no_grad():
        for start in tqdm(range(0, len(files), batch_size), desc="embedding images", unit="batch"):
            images = [open_image(f) for f in files[start:start + batch_size]]  # ImageError says which file
            chunks.append(model.encode_image(images).cpu())
    return torch.cat(chunks), [str(f.relative_to(path)) for f in files]


def load_gallery(path: str | Path, model=None, target: str = "image") -> Index:
    """An :class:`Index` from whatever ``path`` is: an index folder, an exported gallery folder
    (``target`` picks its image, speech or text embeddings), a ``.safetensors`` file of embeddings
    (tensor ``embeddings`` or its only matrix; ids from the metadata key ``ids``, a JSON list), or a
    folder of images (embedded with ``model``)."""
    path = Path(path)
    if not path.exists():
        raise SearchError(f"gallery {path} does not exist")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise SearchError(f"gallery file {path} is not a .safetensors file of embeddings")
        return Index(*_embeddings_file(path))
    if (path / JSON_FILE).is_file():
        return Index.load(path)
    from s2i import gallery as exported

    if exported.find_gallery(path):
        found = exported.Gallery.load(path)
        vectors = found.embeddings(target)
        if vectors is None:
            raise SearchError(f"the gallery in {path} has no {target} embeddings")
        if target == "image":
            ids = [im.get("path") or im.get("image_id") for im in found.images]
        else:
            ids = [c.get("utt_id") for c in found.captions]
        return Index(vectors, ids)
    if model is None:
        raise SearchError(f"{path} is a folder of images; embedding them needs a model")
    return Index(*_image_folder(path, model))


def _embed_query(model, args) -> tuple[Tensor, str]:
    with torch.no_grad():
        if args.audio:
            from s2i.audio import load_audio

            return model.encode_speech(load_audio(args.audio), sample_rate=16000), "speech"
        if args.text is not None:
            if not args.text.strip():
                raise SearchError("the --text query is empty")
            return model.encode_text([args.text]), "text"
        from s2i.encoders.image import ImageError, open_image

        try:
            image = open_image(args.image)  # refuses decompression bombs from the header
        except ImageError as exc:
            raise SearchError(f"cannot read the image: {exc}") from None
        return model.encode_image([image]), "image"


def main(args) -> int:
    import s2i

    model = s2i.load(args.checkpoint, device=args.device)
    query, modality = _embed_query(model, args)
    target = args.target or ("speech" if modality == "image" else "image")
    gallery_path = args.gallery
    if gallery_path is None:  # the gallery exported beside the checkpoint (a folder, or a named model's)
        from s2i import gallery as exported
        from s2i.model import CHECKPOINTS

        folder = Path(args.checkpoint) if Path(args.checkpoint).is_dir() else CHECKPOINTS / args.checkpoint
        gallery_path = exported.find_gallery(folder) if folder.is_dir() else None
        if gallery_path is None:
            raise SearchError(f"{args.checkpoint} has no exported gallery; pass --gallery "
                              "(or make one with `python -m s2i export`)")
    index = load_gallery(gallery_path, model, target)
    if args.save_index:
        index.save(args.save_index)
    scores, indices = index.search(query, args.k)
    results = [{"rank": r + 1, "index": int(i), "id": ident, "score": float(s)}
               for r, (i, ident, s) in enumerate(zip(indices[0], index.lookup(indices[0]), scores[0]))]
    if args.json:
        print(json.dumps({"query": {modality: args.audio or args.text or args.image}, "gallery": str(gallery_path),
                          "target": target, "method": index.method, "results": results}, ensure_ascii=False))
    else:
        print(f"{'rank':>4}  {'score':>7}  id")
        for r in results:
            print(f"{r['rank']:>4}  {r['score']:>7.4f}  {r['id']}")
    return 0
