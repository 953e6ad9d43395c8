"""s2i's Gradio app: search images with your voice, look at what the VQ units learned, train and evaluate.

    python app.py                                   # checkpoints/default and its exported gallery
    python app.py --checkpoint runs/x/best --gallery runs/x/best --port 7861

Runs unchanged on a Hugging Face Space (no arguments: the default checkpoint). Everything the app
shows about the gallery (embeddings, 2-D layout, thumbnails, clips, VQ codes) was computed once by
``python -m s2i export`` (``s2i/export.py``, ``s2i/gallery.py``); a click only embeds the query.

Tabs: Search (speech / text -> images, image -> spoken captions), VQ units, Embeddings, Matchmaps,
Training (a ``python -m s2i train`` subprocess, one at a time) and Evaluation.

One model and gallery are loaded per app and shared by every visitor; loading another checkpoint
(header, or the Training tab) switches it for everyone. Tests build the app with :func:`build_demo`.
"""
from __future__ import annotations

import argparse
import atexit
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

log = logging.getLogger("s2i.app")

ROOT = Path(__file__).resolve().parent
SAMPLE_RATE = 16000
MIN_QUERY_SECONDS = 0.3  # shorter recordings hold no word
MAX_QUERY_SECONDS = 30.0  # longer ones are cut, with a warning
QUIET_PEAK = 1e-3  # a recording whose loudest sample is under -60 dBFS holds no speech
MAX_UPLOAD = "25mb"
N_CAPTION_PLAYERS = 5
BROWSE_SIZE = 24
EXPORT_TIMEOUT_S = 3600  # a gallery export started from the app is stopped after this long


def _problem(message: str) -> gr.Error:
    """A message for the user about their input or the app's state (shown in the UI, no server traceback)."""
    return gr.Error(message, print_exception=False)


# =============================================================================================
# What the app has loaded
# =============================================================================================
_scratch_lock = threading.Lock()
_scratch_root: Path | None = None


def _scratch_folder(prefix: str) -> Path:
    """A new folder inside this process's one temporary folder (``s2i-app-*``, made when first needed,
    removed when the process exits)."""
    global _scratch_root
    with _scratch_lock:
        if _scratch_root is None or not _scratch_root.is_dir():
            _scratch_root = Path(tempfile.mkdtemp(prefix="s2i-app-"))
            atexit.register(shutil.rmtree, _scratch_root, ignore_errors=True)
        return Path(tempfile.mkdtemp(prefix=prefix, dir=_scratch_root))


@dataclass
class Loaded:
    """The model and gallery the app serves, and caches derived from them."""

    model: Any = None
    gallery: Any = None
    checkpoint: str = ""
    problems: list[str] = field(default_factory=list)
    thumbs_dir: Path | None = None  # made when the first thumbnail is written (see image_file)
    _thumb_files: dict[int, str] = field(default_factory=dict)
    _word_tables: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, checkpoint: Any = "default", gallery: Any = None, device: str = "cpu") -> "Loaded":
        """Load a model (a name, a folder, or an ``S2I`` already built) and its exported gallery.

        Failures do not raise: the app starts anyway and says what is missing.
        """
        import s2i
        from s2i.gallery import Gallery, GalleryError, find_gallery

        state = cls()
        if isinstance(checkpoint, torch.nn.Module):
            state.model, state.checkpoint = checkpoint.eval(), getattr(checkpoint.config, "name", "model")
            folder = None
        else:
            state.checkpoint = str(checkpoint)
            folder = _checkpoint_folder(checkpoint)
            try:
                state.model = s2i.load(checkpoint, device=device)
            except (ValueError, OSError) as exc:
                state.problems.append(f"no model loaded: {exc}")
        if isinstance(gallery, Gallery):
            state.gallery = gallery
        else:
            where = gallery if gallery is not None else (find_gallery(folder) if folder is not None else None)
            if where is None:
                state.problems.append(f"no exported gallery beside {state.checkpoint}; make one with "
                                      f"`python -m s2i export {state.checkpoint} --data CORPUS --split test`")
            else:
                try:
                    state.gallery = Gallery.load(where)
                except (GalleryError, OSError, KeyError) as exc:
                    state.problems.append(f"gallery not loaded: {exc}")
        if state.model is not None and state.gallery is not None:
            dim = int(getattr(state.model.config, "embed_dim", state.gallery.image_embeddings.shape[1]))
            if dim != state.gallery.image_embeddings.shape[1]:
                state.problems.append(f"the gallery's embeddings are {state.gallery.image_embeddings.shape[1]}-d but "
                                      f"the model's are {dim}-d: re-export the gallery with this checkpoint")
                state.gallery = None
        return state

    def close(self) -> None:
        """Remove the thumbnails written for this gallery (Gradio has copied those it served into its cache)."""
        folder, self.thumbs_dir = self.thumbs_dir, None
        self._thumb_files.clear()
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

    # ------------------------------------------------------------------ guards
    def need_model(self):
        if self.model is None:
            raise _problem("No model is loaded. " + " ".join(self.problems))
        return self.model

    def need_gallery(self):
        if self.gallery is None:
            raise _problem("No gallery is loaded. " + " ".join(self.problems))
        return self.gallery

    # ------------------------------------------------------------------ gallery files
    def image_file(self, i: int) -> str:
        """A file of gallery image ``i`` to hand to Gradio: the original, or its thumbnail written once."""
        g = self.need_gallery()
        path = g.image_path(i)
        if path is not None:
            return str(path)
        if i not in self._thumb_files:
            if self.thumbs_dir is None:
                self.thumbs_dir = _scratch_folder("thumbs-")
            out = self.thumbs_dir / f"{i:06d}.png"
            g.thumbnail(i).save(out)
            self._thumb_files[i] = str(out)
        return self._thumb_files[i]

    def image_label(self, i: int) -> str:
        im = self.gallery.images[i]
        return str(im.get("image_id", i))

    def word_table(self, layer: str):
        """The gallery's (code, word) precision/recall table for ``layer`` (computed once)."""
        from s2i.analysis.words import WordDetectionError, code_word_table

        if layer not in self._word_tables:
            g = self.need_gallery()
            codes = [g.caption_codes(layer, j).numpy() for j in range(g.num_captions)]
            words = [[tuple(w) for w in c.get("words") or []] for c in g.captions]
            try:
                self._word_tables[layer] = code_word_table(codes, words, g.frame_shift(layer))
            except WordDetectionError:
                self._word_tables[layer] = None
        return self._word_tables[layer]

    def describe(self) -> str:
        lines = []
        if self.model is not None:
            cfg = self.model.config
            vq = ", ".join(self.vq_layers()) or "none"
            lines.append(f"**Model** `{self.checkpoint}` ({cfg.name}: {cfg.speech.arch} speech encoder on "
                         f"{cfg.speech.features}, {cfg.image.arch} image encoder, {cfg.embed_dim}-d, VQ layers: {vq}"
                         f"{', text encoder' if self.model.text is not None else ''})")
        if self.gallery is not None:
            g = self.gallery
            where = "corpus present" if g.meta.get("corpus_dir") else "thumbnails and clips only"
            lines.append(f"**Gallery** {g.meta.get('corpus_name', '?')} / {g.meta.get('split', '?')}: "
                         f"{g.num_images} images, {g.num_captions} spoken captions ({where})")
        lines += [f"⚠️ {p}" for p in self.problems]
        return "  \n".join(lines) or "Nothing loaded."

    def vq_layers(self) -> list[str]:
        if self.model is None:
            return []
        positions = self.model.config.speech.vq_positions or ""
        return [f"vq{p}" for p, c in enumerate(positions) if c == "1"]


def _shown(path: Path) -> str:
    """``path`` as a visitor should see it: relative to the app's folder when inside it."""
    real = Path(path).resolve()
    return str(real.relative_to(ROOT)) if real.is_relative_to(ROOT) else str(real)


def _checkpoint_folder(checkpoint: str | Path) -> Path | None:
    """The folder ``s2i.load`` would read for ``checkpoint`` (a name under checkpoints/ or a path)."""
    path = Path(checkpoint)
    if path.is_dir():
        return path
    named = ROOT / "checkpoints" / str(checkpoint)
    return named if named.is_dir() else None


# =============================================================================================
# Reading a query
# =============================================================================================
def read_query_audio(path: str | None, what: str = "query") -> torch.Tensor:
    """A recorded or uploaded file -> mono 16 kHz waveform, or a :class:`gr.Error` a person can act on."""
    from s2i.audio import AudioError, AudioTruncatedWarning, SilentAudioWarning, load_audio

    if not path:
        raise _problem(f"Record or upload a spoken {what} first.")
    name = Path(path).name
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            wave = load_audio(path, max_seconds=MAX_QUERY_SECONDS)
        except AudioError as exc:
            raise _problem(str(exc).replace(str(path), name)) from None
    kinds = {type(w.message) for w in caught}
    seconds = len(wave) / SAMPLE_RATE
    if SilentAudioWarning in kinds or float(wave.abs().max()) < QUIET_PEAK:
        raise _problem(f"The {what} is silent (nothing louder than -60 dBFS in {seconds:.1f} s): "
                       "check the microphone and record again.")
    if seconds < MIN_QUERY_SECONDS:
        raise _problem(f"The {what} is too short ({seconds:.2f} s): say a whole phrase "
                       f"(at least {MIN_QUERY_SECONDS} s).")
    if AudioTruncatedWarning in kinds:
        gr.Warning(f"The {what} is longer than {MAX_QUERY_SECONDS:.0f} s: only its first "
                   f"{MAX_QUERY_SECONDS:.0f} s are used.")
    return wave


# =============================================================================================
# Figures (matplotlib's object API: no global pyplot state, nothing to leak between threads)
# =============================================================================================
def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=90, layout="constrained")


def _to_image(fig) -> Image.Image:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    fig.clear()
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def _draw_spectrogram(ax, wave: torch.Tensor) -> float:
    from s2i.audio import spectrogram

    spec = spectrogram(wave)
    seconds = len(wave) / SAMPLE_RATE
    ax.imshow(spec.T, origin="lower", aspect="auto", cmap="magma", extent=(0, seconds, 0, spec.shape[1]))
    ax.set_ylabel("mel band")
    return seconds


def spectrogram_image(wave: torch.Tensor, height: int = 160) -> np.ndarray:
    """The log-mel spectrogram as an RGB array (low frequencies at the bottom, one column per 10 ms).

    Drawn straight through a colour map rather than a matplotlib figure: it is part of every search
    and a figure would take longer than the search itself.
    """
    from matplotlib import colormaps
    from s2i.audio import spectrogram

    spec = spectrogram(wave).T[::-1]  # (40, T) dB
    top = float(spec.max())
    level = np.clip((spec - (top - 80.0)) / 80.0, 0.0, 1.0)
    rgb = (colormaps["magma"](level)[..., :3] * 255).astype(np.uint8)
    return np.repeat(rgb, max(1, height // rgb.shape[0]), axis=0)


def _code_colour(code: int):
    from matplotlib import colormaps

    return colormaps["tab20"](int(code) % 20)


def units_image(wave: torch.Tensor, units: dict[str, Any], words: list, title: str = "") -> Image.Image:
    """Spectrogram, one coloured band of merged code segments per VQ layer, and the words under it."""
    from s2i.analysis.words import code_segments

    layers = sorted(units)
    fig = _figure(9, 2.0 + 0.55 * len(layers) + (0.45 if words else 0))
    rows = [3.0] + [0.7] * len(layers) + ([0.6] if words else [])
    axes = fig.subplots(len(rows), 1, sharex=True, gridspec_kw={"height_ratios": rows})
    axes = np.atleast_1d(axes)
    seconds = _draw_spectrogram(axes[0], wave)
    axes[0].set_title(title, fontsize=9)
    for ax, name in zip(axes[1:], layers):
        seq = units[name]
        for code, start, end in code_segments(np.asarray(seq.codes), seq.frame_shift_s):
            ax.axvspan(start, end, color=_code_colour(code), alpha=0.85, lw=0)
            if end - start >= 0.035 * max(seconds, 1e-3) * 0.6:
                ax.text((start + end) / 2, 0.5, str(code), ha="center", va="center", fontsize=6.5,
                        rotation=90 if end - start < 0.05 * seconds else 0)
        ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    if words:
        ax = axes[-1]
        for k, (word, start, end) in enumerate(words):
            ax.axvspan(start, end, color="0.9" if k % 2 else "0.8", lw=0)
            ax.text((start + end) / 2, 0.5, word, ha="center", va="center", fontsize=7)
        ax.set_yticks([])
        ax.set_ylabel("words", rotation=0, ha="right", va="center", fontsize=8)
    axes[-1].set_xlim(0, seconds)
    axes[-1].set_xlabel("time (s)")
    return _to_image(fig)


def usage_image(counts: np.ndarray, layer: str, codebook: int) -> tuple[Image.Image, float]:
    """Code-usage histogram (codes sorted by use) over the gallery, and the layer's perplexity."""
    total = counts.sum()
    p = counts[counts > 0] / max(total, 1)
    perplexity = float(np.exp(-(p * np.log(p)).sum())) if total else 0.0
    order = np.argsort(-counts)
    used = int((counts > 0).sum())
    fig = _figure(7, 2.2)
    ax = fig.add_subplot()
    ax.bar(np.arange(used), counts[order][:used], width=1.0, color=[_code_colour(c) for c in order[:used]])
    ax.set_xlabel("codes, most used first")
    ax.set_ylabel("frames")
    ax.set_title(f"{layer}: {used} of {codebook} codes used in the gallery, perplexity {perplexity:.1f}", fontsize=9)
    return _to_image(fig), perplexity


def _run_curves(train_rows: list[dict], val_rows: list[dict]) -> tuple[Image.Image, Image.Image]:
    fig = _figure(6, 2.6)
    ax = fig.add_subplot()
    if train_rows:
        ax.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], lw=1,
                marker="." if len(train_rows) < 50 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    loss = _to_image(fig)
    fig = _figure(6, 2.6)
    ax = fig.add_subplot()
    for direction in ("speech_to_image", "image_to_speech"):
        for k, style in (("R@1", ":"), ("R@10", "-")):
            pts = [(r["epoch"], r["val"][direction][k]) for r in val_rows if direction in r.get("val", {})]
            if pts:
                ax.plot(*zip(*pts), style, marker="o", ms=3, label=f"{direction.replace('_to_', '→')} {k}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation recall")
    ax.set_ylim(0, 1)
    if val_rows:
        ax.legend(fontsize=7)
    return loss, _to_image(fig)


# =============================================================================================
# Training runs (a subprocess; one at a time)
# =============================================================================================
class Trainer:
    """Starts, watches and stops one ``python -m s2i train`` subprocess at a time."""

    def __init__(self, runs_root: Path, data_root: Path):
        self.runs_root, self.data_root = runs_root, data_root
        self.proc: subprocess.Popen | None = None
        self.run_dir: Path | None = None
        self._log = None
        self.lock = threading.Lock()

    @staticmethod
    def presets() -> list[str]:
        """Presets that train on a prepared corpus's pixels (those reading precomputed features need a cache)."""
        from s2i.config import PRESETS

        return [name for name, (cfg, _) in PRESETS.items() if cfg.image.arch != "linear"]

    def corpora(self) -> list[str]:
        if not self.data_root.is_dir():
            return []
        return sorted(p.name for p in self.data_root.iterdir() if (p / "corpus.json").is_file())

    @staticmethod
    def devices() -> list[str]:
        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self, preset: str, data: str, epochs: Any, device: str) -> tuple[list[str], Path]:
        """The validated argument list (never a shell string) and the run folder."""
        if preset not in self.presets():
            raise _problem(f"Unknown preset {preset!r}; choose one of {self.presets()}.")
        if data not in self.corpora():
            raise _problem(f"No prepared corpus {data!r} under {self.data_root}; make one with "
                           "`python -m s2i prepare synthetic`." if data else "Choose a prepared corpus.")
        try:
            n = int(epochs)
        except (TypeError, ValueError):
            raise _problem(f"Epochs must be a whole number, got {epochs!r}.") from None
        if not 1 <= n <= 1000 or n != float(epochs):
            raise _problem(f"Epochs must be a whole number from 1 to 1000, got {epochs!r}.")
        if device not in self.devices():
            raise _problem(f"Device {device!r} is not available here; choose from {self.devices()}.")
        run_dir = self.runs_root / f"app-{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
        n_same = 1
        while run_dir.exists():  # two runs within a second
            n_same += 1
            run_dir = run_dir.with_name(f"app-{preset}-{time.strftime('%Y%m%d-%H%M%S')}-{n_same}")
        argv = [sys.executable, "-m", "s2i", "train", preset, f"data={self.data_root / data}", f"epochs={n}",
                f"device={device}", f"out_dir={run_dir}", "log_every=5"]
        return argv, run_dir

    def start(self, preset: str, data: str, epochs: Any, device: str) -> Path:
        with self.lock:
            if self.running():
                raise _problem(f"A run is already going ({self.run_dir.name}); stop it first.")
            argv, run_dir = self.command(preset, data, epochs, device)
            run_dir.mkdir(parents=True, exist_ok=True)
            self._log = open(run_dir / "train.log", "ab")
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            self.proc = subprocess.Popen(argv, cwd=str(ROOT), stdout=self._log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env)
            self.run_dir = run_dir
            return run_dir

    def stop(self) -> bool:
        """Ask the run to stop (it saves ``last/`` after its current step); False if none is running."""
        with self.lock:
            if not self.running():
                return False
            self.proc.send_signal(signal.SIGTERM)
            return True

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout) if self.proc is not None else None
        except subprocess.TimeoutExpired:
            return None

    def progress(self) -> tuple[list[dict], list[dict], str]:
        """(training metric lines, validation lines, the log's last lines) of the current run."""
        if self.run_dir is None:
            return [], [], ""
        train_rows, val_rows = [], []
        metrics = self.run_dir / "metrics.jsonl"
        if metrics.is_file():
            for line in metrics.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line being written
                if "val" in row:
                    val_rows.append(row)
                elif "loss" in row:
                    train_rows.append(row)
        tail = ""
        log_file = self.run_dir / "train.log"
        if log_file.is_file():
            with open(log_file, "rb") as f:
                f.seek(max(0, log_file.stat().st_size - 4000))
                text = f.read().decode("utf-8", "replace").replace("\r", "\n")
            tail = "\n".join([ln for ln in text.splitlines() if ln.strip()][-15:])
        return train_rows, val_rows, tail

    def status(self) -> str:
        if self.proc is None:
            return "No run started yet."
        code = self.proc.poll()
        if code is None:
            return f"Running **{self.run_dir.name}** (pid {self.proc.pid})."
        what = "finished" if code == 0 else ("stopped" if code in (130, -signal.SIGTERM) else f"failed (exit {code})")
        return f"Run **{self.run_dir.name}** {what}."

    def model_folder(self) -> Path | None:
        if self.run_dir is None:
            return None
        for name in ("best", "last"):
            if (self.run_dir / name / "config.json").is_file():
                return self.run_dir / name
        return None


# =============================================================================================
# The app
# =============================================================================================
def build_demo(checkpoint: Any = "default", gallery: Any = None, *, device: str = "cpu",
               runs_root: str | Path | None = None, data_root: str | Path | None = None,
               export_layout: str = "umap") -> gr.Blocks:
    """The whole app as a ``gr.Blocks`` (not launched): see the module docstring.

    ``checkpoint``: a name under ``checkpoints/``, a folder, or an ``S2I`` model; ``gallery``: a folder
    with an exported gallery (default: the checkpoint's own) or a loaded ``Gallery``. ``runs_root`` and
    ``data_root`` are where the Training tab writes runs and finds corpora (default: ``runs/``, ``data/``);
    ``export_layout`` is the layout a trained checkpoint's gallery gets when it is loaded ("umap" | "pca").
    """
    from s2i.search import search

    app = {"loaded": Loaded.open(checkpoint, gallery, device)}
    trainer = Trainer(Path(runs_root or ROOT / "runs"), Path(data_root or ROOT / "data"))
    started_with = None if isinstance(checkpoint, torch.nn.Module) else _checkpoint_folder(checkpoint)
    threading.Thread(target=_warm_up, args=(app["loaded"],), daemon=True).start()

    def cur() -> Loaded:
        return app["loaded"]

    # ------------------------------------------------------------------ search
    def _results(scores: torch.Tensor, idx: torch.Tensor) -> tuple[list, list[int], str]:
        s = cur()
        items = [(s.image_file(int(i)), f"#{r + 1} {s.image_label(int(i))} · {float(v):.3f}")
                 for r, (v, i) in enumerate(zip(scores.tolist(), idx.tolist()))]
        table = "\n".join(f"{r + 1}. image **{s.image_label(int(i))}** — score {float(v):.3f}"
                          for r, (v, i) in enumerate(zip(scores.tolist(), idx.tolist())))
        return items, [int(i) for i in idx.tolist()], table

    def search_speech(audio_path, k):
        s = cur()
        model, g = s.need_model(), s.need_gallery()
        wave = read_query_audio(audio_path)
        started = time.perf_counter()
        with torch.no_grad():
            query = model.encode_speech(wave, sample_rate=SAMPLE_RATE)
        scores, idx = search(query, g.image_embeddings, k=_top_k(k))
        items, ids, table = _results(scores[0], idx[0])
        status = (f"Spoken query ({len(wave) / SAMPLE_RATE:.1f} s), searched {g.num_images} images in "
                  f"{1000 * (time.perf_counter() - started):.0f} ms:\n\n{table}")
        state = {"kind": "speech", "label": f"your recording ({len(wave) / SAMPLE_RATE:.1f} s)",
                 "embedding": query[0].tolist(), "audio": audio_path}
        return items, spectrogram_image(wave), status, ids, state

    def search_text(text, k):
        s = cur()
        model, g = s.need_model(), s.need_gallery()
        text = (text or "").strip()
        if not text:
            raise _problem("Type a description of an image first.")
        if model.text is None:
            raise _problem(f"The model {model.config.name!r} has no text encoder: search with speech instead.")
        with torch.no_grad():
            query = model.encode_text([text[:500]])
        scores, idx = search(query, g.image_embeddings, k=_top_k(k))
        items, ids, table = _results(scores[0], idx[0])
        state = {"kind": "text", "label": f"“{text[:60]}”", "embedding": query[0].tolist(), "audio": None}
        return items, f"Typed query “{text[:80]}”:\n\n{table}", ids, state

    def image_to_speech(image_index):
        s = cur()
        g = s.need_gallery()
        i = _index(image_index, g.num_images, "image")
        scores, idx = search(g.image_embeddings[i], g.speech_embeddings, k=N_CAPTION_PLAYERS)
        lines, players = [f"Spoken captions nearest to image **{s.image_label(i)}**:"], []
        for r, (v, j) in enumerate(zip(scores[0].tolist(), idx[0].tolist())):
            c = g.captions[j]
            mark = "✅" if c["image_index"] == i else "❌"
            lines.append(f"{r + 1}. {mark} {float(v):.3f} — “{c.get('text', '')}” ({c.get('speaker', '')})")
            path = g.audio_path(j)
            label = f"#{r + 1}: {c.get('text', '')[:60]}" + ("" if path else " (no audio exported)")
            players.append(gr.update(value=str(path) if path else None, label=label))
        players += [gr.update(value=None, label="—")] * (N_CAPTION_PLAYERS - len(players))
        return (s.image_file(i), "\n".join(lines), *players)

    def browse(seed):
        s = cur()
        g = s.need_gallery()
        rng = np.random.default_rng(abs(int(seed or 0)) % 2**32)
        ids = sorted(rng.choice(g.num_images, size=min(BROWSE_SIZE, g.num_images), replace=False).tolist())
        return [(s.image_file(i), s.image_label(i)) for i in ids], ids

    def pick(ids, evt: gr.SelectData):
        return ids[evt.index] if ids and evt.index is not None and evt.index < len(ids) else None

    # ------------------------------------------------------------------ VQ units
    def _units_outputs(wave, words, title, layer, units=None):
        s = cur()
        model = s.need_model()
        layers = s.vq_layers()
        if not layers:
            raise _problem(f"The model {model.config.name!r} has no VQ layers: there are no units to show.")
        layer = layer if layer in layers else layers[0]
        if units is None:
            with torch.no_grad():
                units = model.units(wave, sample_rate=SAMPLE_RATE)
        picture = units_image(wave, units, words, title)
        hist, summary = None, ""
        codes_here = units[layer].codes.numpy()
        counts_here = np.bincount(codes_here[codes_here >= 0], minlength=1)
        if s.gallery is not None and layer in s.gallery.codes:
            codebook = model.config.speech.vq_sizes[int(layer[2:])]
            all_codes = s.gallery.codes[layer][0].numpy()
            hist, perplexity = usage_image(np.bincount(all_codes[all_codes >= 0], minlength=codebook), layer, codebook)
            summary = f"Gallery perplexity of {layer}: {perplexity:.1f}. "
        from s2i.analysis.words import code_segments

        segs = code_segments(codes_here, units[layer].frame_shift_s)
        summary += (f"This utterance: {len(segs)} segments of {layer} ({units[layer].frame_shift_s * 1000:.0f} ms "
                    f"frames), {int((counts_here > 0).sum())} distinct codes.")
        choices = [(f"{c} ({int(counts_here[c])} frames)", int(c))
                   for c in np.argsort(-counts_here) if counts_here[c] > 0]
        utt = {"wave": wave.numpy(), "words": words, "title": title, "units": {
            n: {"codes": u.codes.tolist(), "shift": u.frame_shift_s} for n, u in units.items()}}
        return (picture, hist, summary, gr.update(choices=choices, value=choices[0][1] if choices else None),
                gr.update(choices=layers, value=layer), utt)

    def units_from_audio(audio_path, layer):
        wave = read_query_audio(audio_path, "recording")
        return _units_outputs(wave, [], "your recording", layer)

    def units_from_caption(caption_index, layer):
        s = cur()
        g = s.need_gallery()
        j = _index(caption_index, g.num_captions, "caption")
        path = g.audio_path(j)
        if path is None:
            raise _problem(f"Caption {j} has no audio here (the corpus is absent and no clip of it was exported); "
                           "pick another caption.")
        from s2i.audio import load_audio

        wave = load_audio(path, max_seconds=None)
        c = g.captions[j]
        units = None
        if set(g.codes) == set(s.vq_layers()):
            # the codes computed at export from the original audio (a clip is lossy-compressed)
            from s2i.model import UnitSequence

            units = {name: UnitSequence(g.caption_codes(name, j), g.frame_shift(name)) for name in g.codes}
        return _units_outputs(wave, [tuple(w) for w in c.get("words") or []], f"caption {j}: “{c.get('text', '')}”",
                              layer, units)

    def code_info(utt, layer, code):
        s = cur()
        if not utt:
            raise _problem("Analyse a recording or a gallery caption first.")
        if layer not in utt["units"]:
            raise _problem(f"Unknown VQ layer {layer!r}.")
        if code is None:
            raise _problem("Choose a code.")
        from s2i.analysis.words import code_segments, segments_for_code

        code = int(code)
        unit = utt["units"][layer]
        wave = np.asarray(utt["wave"], dtype=np.float32)
        mine = [(a, b) for c, a, b in code_segments(unit["codes"], unit["shift"]) if c == code]
        if not mine:
            raise _problem(f"Code {code} does not occur in this utterance's {layer}.")
        here = _concatenate([wave[int(a * SAMPLE_RATE):int(b * SAMPLE_RATE)] for a, b in mine], pad=0.05)
        lines = [f"**Code {code}** of {layer}: {len(mine)} segment(s) in this utterance "
                 f"({', '.join(f'{a:.2f}–{b:.2f} s' for a, b in mine[:8])})."]
        others_audio = None
        g = s.gallery
        if g is not None and layer in g.codes:
            codes = [g.caption_codes(layer, j).numpy() for j in range(g.num_captions)]
            words = [[tuple(w) for w in c.get("words") or []] for c in g.captions]
            occ = segments_for_code(code, codes, g.frame_shift(layer), words=words, limit=400)
            lines.append(f"\nIn the gallery: {len(occ)}{'+' if len(occ) == 400 else ''} segments.")
            pieces, shown = [], []
            from s2i.audio import load_audio

            for o in occ:
                if len(pieces) >= 8:
                    break
                path = g.audio_path(int(o.utt))
                if path is None:
                    continue
                other = load_audio(path, max_seconds=None).numpy()
                pieces.append(other[int(o.start * SAMPLE_RATE):int(o.end * SAMPLE_RATE)])
                shown.append(f"- caption {o.utt} ({o.start:.2f}–{o.end:.2f} s): "
                             f"{' '.join(o.words) or '(no word)'} — “{g.captions[int(o.utt)].get('text', '')}”")
            if pieces:
                others_audio = (SAMPLE_RATE, _concatenate(pieces, pad=0.25))
                lines += ["Played on the right, in order:"] + shown
            table = s.word_table(layer)
            if table is not None:
                rows = table.for_code(code).rows(limit=8)
                if rows:
                    lines.append("\n| word | precision | recall | F1 |\n|---|---|---|---|")
                    lines += [f"| {r['word']} | {r['precision']:.2f} | {r['recall']:.2f} | {r['f1']:.2f} |"
                              for r in rows]
                else:
                    lines.append("\nThis code overlaps no content word in the gallery.")
        return (SAMPLE_RATE, here), others_audio, "\n".join(lines)

    # ------------------------------------------------------------------ embeddings
    def color_choices() -> list[str]:
        g = cur().gallery
        keys = set()
        if g is not None:
            for i in range(g.num_images):
                keys.update(g.scene_attributes(i))
        return ["modality"] + sorted(keys)

    def embeddings(color_by, query):
        import pandas as pd

        s = cur()
        g = s.need_gallery()
        if not g.layout:
            raise _problem("This gallery has no 2-D layout; re-export it.")
        frames = []
        attributes = [g.scene_attributes(i) for i in range(g.num_images)] if color_by != "modality" else []
        scene = lambda i: attributes[i].get(color_by, "(none)")  # noqa: E731
        for modality, xy in g.layout.items():
            n = len(xy)
            if modality == "image":
                labels = [f"image {s.image_label(i)}" for i in range(n)]
                group = [scene(i) for i in range(n)] if color_by != "modality" else ["image"] * n
            else:
                labels = [f"{modality}: {c.get('text', '')}" for c in g.captions]
                group = ([scene(c["image_index"]) for c in g.captions] if color_by != "modality"
                         else [modality] * n)
            frames.append(pd.DataFrame({"x": xy[:, 0].numpy(), "y": xy[:, 1].numpy(), "group": [str(v) for v in group],
                                        "item": labels}))
        method = g.meta.get("layout", {}).get("method", "?")
        note = f"{sum(len(f) for f in frames)} points ({method} layout made at export)."
        if query:
            x, y = g.place(torch.tensor(query["embedding"]))
            frames.append(pd.DataFrame({"x": [x], "y": [y], "group": ["★ query"], "item": [query["label"]]}))
            note += f" ★ = {query['label']}, placed among its nearest stored neighbours."
        return pd.concat(frames, ignore_index=True), note

    # ------------------------------------------------------------------ matchmaps
    def matchmap(audio_path, query, image_index, time_s):
        s = cur()
        model, g = s.need_model(), s.need_gallery()
        path = audio_path or (query or {}).get("audio")
        if not path:
            raise _problem("Record or upload speech here, or make a spoken query on the Search tab first.")
        wave = read_query_audio(path)
        i = _index(image_index, g.num_images, "image")
        image = g.image(i)
        with torch.no_grad():
            fmap = model.image_map([image])
            if fmap is None:
                raise _problem(f"The image encoder of {model.config.name!r} ({model.config.image.arch}) has no "
                               "spatial map, so there is no matchmap.")
            out = model.encode_speech_features(*model.speech_features(wave, SAMPLE_RATE))
            frames = out.frames[0, : int(out.lengths[0])]
            if frames.shape[-1] != fmap.shape[1]:
                frames = model.speech.project(frames)  # the pooled projection is linear: apply it per frame
            mm = torch.einsum("tc,chw->thw", frames.float(), fmap[0].float()).cpu().numpy()
        seconds = len(wave) / SAMPLE_RATE
        shift = seconds / mm.shape[0]
        t = min(mm.shape[0] - 1, max(0, int(float(time_s or 0) / shift)))
        display = np.asarray(image.resize((256, round(256 * image.height / image.width))))
        overall = _overlay(display, mm.max(0), f"max over time: image {s.image_label(i)}")
        at_t = _overlay(display, mm[t], f"at {t * shift:.2f} s")
        fig = _figure(7, 2.6)
        ax1, ax2 = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
        _draw_spectrogram(ax1, wave)
        ax1.axvline(t * shift, color="cyan", lw=1)
        ax2.plot(np.arange(mm.shape[0]) * shift, mm.reshape(mm.shape[0], -1).max(1), lw=1)
        ax2.set_ylabel("best region")
        ax2.set_xlabel("time (s)")
        curve = _to_image(fig)
        score = float(torch.nn.functional.normalize(fmap[0].float().mean((1, 2)), dim=0)
                      @ model.encode_speech(wave)[0].float())
        note = (f"{mm.shape[0]} speech frames × {mm.shape[1]}×{mm.shape[2]} image regions; "
                f"image–speech similarity {score:.3f}.")
        return overall, at_t, curve, note, gr.update(maximum=round(seconds, 2))

    # ------------------------------------------------------------------ training
    def train_start(preset, data, epochs, device):
        run_dir = trainer.start(preset, data, epochs, device)
        return (f"Started **{run_dir.name}**: `python -m s2i train {preset} data=… epochs={int(epochs)} "
                f"device={device}`.", gr.update(active=True))

    def train_stop():
        if not trainer.stop():
            return trainer.status()
        code = trainer.wait(60)
        return trainer.status() + ("" if code is not None else " (still saving its checkpoint …)")

    def train_poll():
        train_rows, val_rows, tail = trainer.progress()
        loss, recall = _run_curves(train_rows, val_rows)
        status = trainer.status()
        if val_rows:
            last = val_rows[-1]["val"]
            status += " Last validation: " + ", ".join(
                f"{d.replace('_to_', '→')} R@10 {last[d]['R@10']:.2f}"
                for d in ("speech_to_image", "image_to_speech") if d in last)
        return loss, recall, tail, status, gr.update(active=trainer.running())

    def load_run():
        folder = trainer.model_folder()
        if folder is None:
            raise _problem("No finished run with a checkpoint yet.")
        yield from load_checkpoint(str(folder))

    def loadable(path: Path) -> bool:
        """Whether a visitor may load (and export a gallery into) ``path``: folders under checkpoints/ or
        the runs folder, and the checkpoint the app was started with; nothing else on the server."""
        real = path.resolve()
        if started_with is not None and real == started_with.resolve():
            return True
        return any(real.is_relative_to(root.resolve()) for root in (ROOT / "checkpoints", trainer.runs_root))

    def load_checkpoint(folder):
        """Load a checkpoint folder into every tab; exports its gallery first if it has none."""
        from s2i.evaluate import default_data
        from s2i.gallery import find_gallery

        folder = (folder or "").strip()
        path = _checkpoint_folder(folder) if folder else None
        # one message whether the folder is missing or outside: the box does not tell what exists elsewhere
        if path is None or not loadable(path) or not (path / "config.json").is_file():
            roots = " or ".join(f"{_shown(root)}/" for root in (ROOT / "checkpoints", trainer.runs_root))
            raise _problem(f"{folder!r} is not a checkpoint folder under {roots} "
                           "(a folder with model.safetensors + config.json).")
        if find_gallery(path) is None:
            # the test split of the corpus the model was trained on, else the current gallery's corpus
            old = cur().gallery
            corpus = Path(default_data(path))
            corpus = corpus if corpus.is_absolute() else ROOT / corpus
            if not Path(corpus, "corpus.json").is_file() and old is not None and old.meta.get("corpus_dir"):
                corpus = old.meta["corpus_dir"]
            if not Path(corpus, "corpus.json").is_file():
                raise _problem(f"{path} has no gallery and no corpus to make one from ({corpus}).")
            yield (f"Exporting a gallery for {path.name} from {corpus} (minutes on a CPU: embedding the test "
                   "split, fitting the UMAP layout) …", gr.update(),
                   gr.update(), gr.update())
            argv = [sys.executable, "-m", "s2i", "export", str(path), "--data", str(corpus), "--split", "test",
                    "--max-clips", "0", "--layout", export_layout]
            try:
                done = subprocess.run(argv, cwd=str(ROOT), capture_output=True, text=True, timeout=EXPORT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                raise _problem(f"exporting the gallery took over {EXPORT_TIMEOUT_S // 60} minutes and was stopped; "
                               f"run `python -m s2i export {path} --data {corpus} --split test` yourself, "
                               "then load the folder again.") from None
            if done.returncode != 0:
                last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
                raise _problem(f"export failed: {last}")
        loaded = Loaded.open(str(path), None)
        if loaded.model is None:
            loaded.close()
            raise _problem(" ".join(loaded.problems))
        old, app["loaded"] = app["loaded"], loaded
        old.close()
        layers = loaded.vq_layers()
        yield (f"Loaded {path}.", loaded.describe(), gr.update(choices=layers, value=layers[0] if layers else None),
               gr.update(choices=color_choices(), value="modality"))

    # ------------------------------------------------------------------ evaluation
    def evaluate_model(recompute, by=""):
        """R@k of the loaded model: from the gallery's stored embeddings (instant), or, with
        ``recompute``, by embedding the corpus split again with ``s2i.evaluate``; ``by`` (a field of
        the caption records, see ``python -m s2i evaluate --by``) also breaks speech/text -> image
        down by group of captions, to show where the model fails."""
        from s2i.evaluate import DIRECTIONS, breakdown, group_key, scores as retrieval

        s = cur()
        model, g = s.need_model(), s.need_gallery()
        started = time.perf_counter()
        corpus = g.meta.get("corpus_dir")
        split = g.meta.get("split", "test")
        if recompute:
            if not (corpus and Path(corpus, f"{split}.jsonl").is_file()):
                raise _problem(f"The corpus of this gallery ({g.meta.get('corpus_name', '?')}) is not here: "
                               "untick re-embedding to evaluate on the exported embeddings.")
            from s2i.evaluate import evaluate

            try:
                result = evaluate(model, corpus, split=split, by=by or None)
            except ValueError as e:
                raise _problem(str(e)) from None
            source = f"{split} split of {Path(corpus).name}, embedded now"
        else:
            result = retrieval(g.speech_embeddings, g.image_embeddings, g.caption_image, g.text_embeddings)
            if by:  # the gallery keeps each caption's record and each image's scene
                try:
                    keys = [group_key(g.caption_record(j), by) for j in range(g.num_captions)]
                except ValueError as e:
                    raise _problem(str(e)) from None
                result["by"] = {"field": by, "groups": breakdown(g.speech_embeddings, g.image_embeddings,
                                                                 g.caption_image, g.text_embeddings, keys)}
            source = (f"exported embeddings of the {split} split ({g.num_images} images, {g.num_captions} "
                      "captions; float16)")
        groups = result.get("by", {}).get("groups", {})
        group_rows = [[name, grp["captions"], *(round(100 * grp[d][k], 1) if d in grp else None
                                                for d in ("speech_to_image", "text_to_image") for k in ("R@1", "R@10"))]
                      for name, grp in groups.items()]
        rows = [[d.replace("_to_", " → "), *(round(100 * result[d][k], 1) for k in ("R@1", "R@5", "R@10")),
                 result[d]["median_rank"], round(result[d]["mean_rank"], 1)] for d in DIRECTIONS if d in result]
        # failure cases: spoken captions whose image ranks worst
        sim = g.speech_embeddings @ g.image_embeddings.T
        correct = sim.gather(1, g.caption_image[:, None])
        ranks = (sim > correct).sum(1) + 1
        worst = torch.argsort(ranks, descending=True, stable=True)[:4].tolist()
        cases, lines, players = [], ["Hardest spoken captions (speech → image):"], []
        for j in worst:
            c = g.captions[j]
            top = int(sim[j].argmax())
            cases.append((s.image_file(c["image_index"]), f"caption {j}: its image (rank {int(ranks[j])})"))
            cases.append((s.image_file(top), f"caption {j}: retrieved first"))
            lines.append(f"- caption {j}, rank {int(ranks[j])} of {g.num_images}: “{c.get('text', '')}”")
            path = g.audio_path(j)
            players.append(gr.update(value=str(path) if path else None, label=f"caption {j}: {c.get('text', '')[:50]}"))
        players += [gr.update(value=None)] * (4 - len(players))
        note = f"R@k in %, ranks 1-based, on the {source} ({time.perf_counter() - started:.1f} s)."
        return rows, note, group_rows, cases, "\n".join(lines), *players

    # ------------------------------------------------------------------ layout
    with gr.Blocks(title="s2i: speech ↔ image") as demo:
        gr.Markdown("# s2i: speech ↔ image\nSpeak (or type) a description of a picture; see what the speech "
                    "encoder's discrete units learned.")
        header = gr.Markdown(cur().describe(), elem_id="loaded")
        query_state = gr.State(None)
        result_ids = gr.State([])
        browse_ids = gr.State([])
        utt_state = gr.State(None)

        with gr.Tab("Search", id="search"):
            with gr.Row():
                with gr.Column():
                    query_audio = gr.Audio(sources=["microphone", "upload"], type="filepath", elem_id="query_audio",
                                           label="Spoken query (record or upload)")
                    speech_btn = gr.Button("Search with speech", variant="primary", elem_id="search_speech")
                    query_text = gr.Textbox(label="…or type a query", elem_id="query_text",
                                            placeholder="a red circle above a blue square")
                    text_btn = gr.Button("Search with text", elem_id="search_text")
                    top_k = gr.Slider(1, 20, value=5, step=1, label="results")
                with gr.Column():
                    results = gr.Gallery(label="Best-matching images (click one for its spoken captions)",
                                         elem_id="results", columns=5, height=260, object_fit="contain")
                    search_status = gr.Markdown(elem_id="search_status")
                    query_spec = gr.Image(label="Query spectrogram (time →, 10 ms per column; 40 mel bands)",
                                          interactive=False, elem_id="query_spec", format="png", height=180)
            with gr.Row():
                with gr.Column():
                    browse_gallery = gr.Gallery(label="Browse the gallery (click an image)", columns=8, height=220,
                                                elem_id="browse")
                    with gr.Row():
                        browse_seed = gr.Number(value=0, precision=0, label="shuffle seed")
                        browse_btn = gr.Button("Shuffle")
                with gr.Column():
                    with gr.Row():
                        image_index = gr.Number(value=0, precision=0, label="gallery image #", elem_id="image_index")
                        captions_btn = gr.Button("Nearest spoken captions", elem_id="nearest_captions")
                    picked = gr.Image(label="Picked image", interactive=False, height=160)
                    captions_md = gr.Markdown()
                    caption_players = [gr.Audio(label=f"#{r + 1}", interactive=False, type="filepath")
                                       for r in range(N_CAPTION_PLAYERS)]

        with gr.Tab("VQ units", id="units"):
            with gr.Row():
                units_audio = gr.Audio(sources=["microphone", "upload"], type="filepath", elem_id="units_audio",
                                       label="Record or upload an utterance")
                with gr.Column():
                    layer = gr.Dropdown(cur().vq_layers(), value=(cur().vq_layers() or [None])[0], label="VQ layer")
                    units_btn = gr.Button("Analyse the recording", variant="primary")
                    caption_index = gr.Number(value=0, precision=0, label="…or gallery caption #")
                    caption_btn = gr.Button("Analyse the gallery caption", elem_id="analyse_caption")
            units_plot = gr.Image(label="Spectrogram, VQ codes over time (merged runs), words", interactive=False)
            units_md = gr.Markdown()
            usage_plot = gr.Image(label="Code usage over the gallery", interactive=False)
            with gr.Row():
                code = gr.Dropdown([], label="Code (in this utterance)", elem_id="code")
                code_btn = gr.Button("Hear it and find it elsewhere")
            with gr.Row():
                code_here = gr.Audio(label="This code in this utterance", interactive=False)
                code_elsewhere = gr.Audio(label="The same code in other gallery captions", interactive=False)
            code_md = gr.Markdown()

        with gr.Tab("Embeddings", id="embeddings"):
            with gr.Row():
                color_by = gr.Dropdown(color_choices(), value="modality", label="Colour by")
                layout_btn = gr.Button("Show", variant="primary")
            layout_plot = gr.ScatterPlot(x="x", y="y", color="group", tooltip=["item", "group"], height=600,
                                         label="Images and captions (2-D layout computed at export)")
            layout_md = gr.Markdown()

        with gr.Tab("Matchmaps", id="matchmaps"):
            with gr.Row():
                mm_audio = gr.Audio(sources=["microphone", "upload"], type="filepath", elem_id="mm_audio",
                                    label="Speech (empty: the Search tab's spoken query)")
                with gr.Column():
                    mm_image = gr.Number(value=0, precision=0, label="gallery image # (Search results fill it in)")
                    mm_time = gr.Slider(0, 10, value=0, step=0.01, label="time (s)")
                    mm_btn = gr.Button("Compute the matchmap", variant="primary")
            with gr.Row():
                mm_overall = gr.Image(label="Best match of any speech frame per region", interactive=False)
                mm_at = gr.Image(label="Regions matching the frame at the chosen time", interactive=False)
            mm_curve = gr.Image(label="Speech over time", interactive=False)
            mm_md = gr.Markdown()

        with gr.Tab("Training", id="training"):
            with gr.Row():
                presets = Trainer.presets()
                t_preset = gr.Dropdown(presets, value="rnn_vq_small" if "rnn_vq_small" in presets else presets[0],
                                       label="Preset")
                corpora = trainer.corpora()
                t_data = gr.Dropdown(corpora, value=corpora[0] if corpora else None,
                                     label="Data (prepared corpora in data/)")
                t_epochs = gr.Number(value=2, precision=0, minimum=1, maximum=1000, label="Epochs")
                t_device = gr.Dropdown(Trainer.devices(), value="cpu", label="Device")
            with gr.Row():
                t_start = gr.Button("Start", variant="primary")
                t_stop = gr.Button("Stop", variant="stop")
                t_load = gr.Button("Load its checkpoint into the app")
            t_status = gr.Markdown(trainer.status())
            with gr.Row():
                t_loss = gr.Image(label="Loss", interactive=False)
                t_recall = gr.Image(label="Validation recall", interactive=False)
            t_log = gr.Textbox(label="Log (last lines)", lines=8, max_lines=15, interactive=False)
            timer = gr.Timer(2.0, active=False)
            with gr.Row():
                ckpt_path = gr.Textbox(label="…or load any checkpoint folder", placeholder="runs/NAME/best")
                ckpt_btn = gr.Button("Load")

        with gr.Tab("Evaluation", id="evaluation"):
            with gr.Row():
                eval_recompute = gr.Checkbox(False, label="re-embed the split from the corpus (slow; default: the "
                                                          "gallery's stored embeddings)")
                eval_btn = gr.Button("Evaluate the loaded model on its test split", variant="primary")
            eval_table = gr.Dataframe(headers=["direction", "R@1", "R@5", "R@10", "median rank", "mean rank"],
                                      interactive=False)
            eval_md = gr.Markdown()
            eval_by = gr.Dropdown(
                [("nothing", ""), ("accent", "speaker~^([^+]+)"), ("voice", "speaker"), ("scene layout", "scene.layout"),
                 ("the object, in one-object scenes", "scene.objects.kind~^([^,]+)$")], value="",
                allow_custom_value=True, label="Break speech → image and text → image down by (or type a field "
                                               "of the caption records, as `python -m s2i evaluate --by`)")
            eval_groups = gr.Dataframe(headers=["group", "captions", "speech → image R@1", "R@10",
                                                "text → image R@1", "R@10"], interactive=False)
            eval_cases = gr.Gallery(label="Failure cases: the caption's image, and what was retrieved first", columns=4,
                                    height=260)
            eval_cases_md = gr.Markdown()
            with gr.Row():
                eval_players = [gr.Audio(label=f"case {r + 1}", interactive=False, type="filepath") for r in range(4)]

        # ------------------------------------------------------------------ events
        heavy = dict(concurrency_limit=2, concurrency_id="model")
        speech_btn.click(search_speech, [query_audio, top_k],
                         [results, query_spec, search_status, result_ids, query_state],
                         api_name="search_speech", **heavy)
        text_btn.click(search_text, [query_text, top_k], [results, search_status, result_ids, query_state],
                       api_name="search_text", **heavy)
        query_text.submit(search_text, [query_text, top_k], [results, search_status, result_ids, query_state],
                          api_visibility="private", **heavy)
        captions_btn.click(image_to_speech, [image_index], [picked, captions_md, *caption_players],
                           api_name="image_to_speech", **heavy)
        browse_btn.click(browse, [browse_seed], [browse_gallery, browse_ids], api_name="browse")
        demo.load(browse, [browse_seed], [browse_gallery, browse_ids], api_visibility="private")
        demo.load(lambda: gr.update(choices=trainer.corpora()), None, [t_data], api_visibility="private")
        for gallery_box, ids in ((results, result_ids), (browse_gallery, browse_ids)):
            gallery_box.select(pick, [ids], [image_index], api_visibility="private").then(
                image_to_speech, [image_index], [picked, captions_md, *caption_players], api_visibility="private"
            ).then(lambda i: i, [image_index], [mm_image], api_visibility="private")
        units_outputs = [units_plot, usage_plot, units_md, code, layer, utt_state]
        units_btn.click(units_from_audio, [units_audio, layer], units_outputs, api_name="units_audio", **heavy)
        caption_btn.click(units_from_caption, [caption_index, layer], units_outputs, api_name="units_caption", **heavy)
        code_btn.click(code_info, [utt_state, layer, code], [code_here, code_elsewhere, code_md], api_name="code_info",
                       **heavy)
        layout_btn.click(embeddings, [color_by, query_state], [layout_plot, layout_md], api_name="embeddings")
        mm_inputs = [mm_audio, query_state, mm_image, mm_time]
        mm_outputs = [mm_overall, mm_at, mm_curve, mm_md, mm_time]
        mm_btn.click(matchmap, mm_inputs, mm_outputs, api_name="matchmap", **heavy)
        mm_time.release(matchmap, mm_inputs, mm_outputs, api_visibility="private", trigger_mode="always_last", **heavy)
        t_start.click(train_start, [t_preset, t_data, t_epochs, t_device], [t_status, timer], api_name="train_start")
        t_stop.click(train_stop, None, [t_status], api_name="train_stop")
        timer.tick(train_poll, None, [t_loss, t_recall, t_log, t_status, timer], api_name="train_progress")
        t_load.click(load_run, None, [t_status, header, layer, color_by], api_name="train_load")
        ckpt_btn.click(load_checkpoint, [ckpt_path], [t_status, header, layer, color_by], api_name="load_checkpoint")
        eval_btn.click(evaluate_model, [eval_recompute, eval_by],
                       [eval_table, eval_md, eval_groups, eval_cases, eval_cases_md, *eval_players],
                       api_name="evaluate", **heavy)
        demo.queue(default_concurrency_limit=4, max_size=64)
    demo.s2i_loaded = lambda: app["loaded"]  # type: ignore[attr-defined]  # for tests and allowed_paths
    demo.s2i_trainer = trainer  # type: ignore[attr-defined]
    return demo


def _warm_up(loaded: Loaded) -> None:
    """Pay the first-call costs (matplotlib's import, torch's first forward) before the first visitor does."""
    try:
        wave = torch.sin(torch.arange(SAMPLE_RATE, dtype=torch.float32) * 0.05) * 0.1
        spectrogram_image(wave)
        if loaded.model is not None:
            with torch.no_grad():
                loaded.model.encode_speech(wave)
    except Exception:  # noqa: BLE001 - a failed warm-up only costs the first query its speed
        log.debug("warm-up failed", exc_info=True)


def _top_k(k: Any) -> int:
    try:
        return max(1, min(int(k), 50))
    except (TypeError, ValueError):
        raise _problem(f"The number of results must be a whole number, got {k!r}.") from None


def _index(value: Any, n: int, what: str) -> int:
    try:
        i = int(value)
    except (TypeError, ValueError):
        raise _problem(f"Give a {what} number from 0 to {n - 1}.") from None
    if not 0 <= i < n or i != float(value):
        raise _problem(f"There is no {what} #{value}: the gallery has {what}s 0 to {n - 1}.")
    return i


def _concatenate(pieces: list[np.ndarray], pad: float) -> np.ndarray:
    """Audio snippets one after another with ``pad`` seconds of silence between, as int16 for playing."""
    gap = np.zeros(int(pad * SAMPLE_RATE), dtype=np.float32)
    out = []
    for p in pieces:
        out += [np.asarray(p, dtype=np.float32), gap]
    joined = np.concatenate(out[:-1]) if out else gap
    return (np.clip(joined, -1, 1) * 32767).astype(np.int16)


def _overlay(image: np.ndarray, heat: np.ndarray, title: str) -> Image.Image:
    fig = _figure(3.4, 3.4 * image.shape[0] / image.shape[1] + 0.3)
    ax = fig.add_subplot()
    ax.imshow(image)
    ax.imshow(heat, cmap="jet", alpha=0.45, extent=(0, image.shape[1], image.shape[0], 0), interpolation="bilinear")
    ax.set_axis_off()
    ax.set_title(title, fontsize=8)
    return _to_image(fig)


def allowed_paths(demo: gr.Blocks) -> list[str]:
    """What the app serves files from: the gallery, its corpus, the checkpoints and the runs."""
    loaded = demo.s2i_loaded()  # type: ignore[attr-defined]
    paths = [ROOT / "checkpoints", demo.s2i_trainer.runs_root]  # type: ignore[attr-defined]
    if loaded.gallery is not None:
        paths.append(loaded.gallery.root)
        if loaded.gallery.meta.get("corpus_dir"):
            paths.append(Path(loaded.gallery.meta["corpus_dir"]))
    if loaded.thumbs_dir is not None:
        paths.append(loaded.thumbs_dir)
    return sorted({str(Path(p).resolve()) for p in paths})


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = 7860, **kwargs):
    """Launch with the app's fixed settings: no SSR, no share link, upload limit, limited file access, and
    the messages of errors raised while Gradio checks an input (a string for a number, ...) shown too."""
    return demo.launch(server_name=host, server_port=port, ssr_mode=False, share=False, max_file_size=MAX_UPLOAD,
                       show_error=True,
                       allowed_paths=allowed_paths(demo), footer_links=["api", "settings"], **kwargs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="s2i Gradio app")
    parser.add_argument("--checkpoint", default="default", help="a name under checkpoints/ or a checkpoint folder")
    parser.add_argument("--gallery", default=None, help="an exported gallery folder (default: the checkpoint's)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    demo = build_demo(args.checkpoint, args.gallery, device=args.device)
    launch(demo, args.host, args.port)


if __name__ == "__main__":
    main()
