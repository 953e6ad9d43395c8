"""Training checkpoints: everything needed to continue a run exactly, written atomically, never pickled.

A run folder holds two checkpoints::

    RUN/last/   model.safetensors + config.json      (the model, ``s2i.model.save`` format: s2i.load() reads it)
                training_state.safetensors + .json   (optimiser, schedule step, RNG states, epoch/step, best metric, config)
    RUN/best/   model.safetensors + config.json      (the best model by validation score; a plain model folder)

Nested training state (an optimiser's ``state_dict()``, RNG states, numbers, config dicts) is split by
:func:`flatten` into a flat ``{key: tensor}`` map (stored as safetensors) and a JSON *skeleton* in which
each tensor is replaced by ``{"__tensor__": key}``; :func:`unflatten` puts them back together. No pickle
anywhere, so loading a checkpoint can never run code.

Atomicity: :func:`write_atomic` fills ``RUN/ckpt.tmp-XXXX/``, fsyncs every file and the folder, then
moves it onto ``RUN/last``. A folder cannot be renamed over a non-empty one, so the previous checkpoint
is first renamed to ``RUN/last.old`` and removed only after the new one is in place; :func:`resolve`
falls back to ``last.old`` if a crash struck between the two renames. A crash at any moment therefore
leaves a complete checkpoint.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from s2i.files import read_header
from s2i.model import CheckpointError

log = logging.getLogger(__name__)

STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"
FORMAT = "s2i-training-state"
VERSION = 1


# ---------------------------------------------------------------------------------------------
# nested state <-> (tensors, JSON skeleton)
# ---------------------------------------------------------------------------------------------
def _is_tagged(d: dict) -> bool:
    return any(isinstance(k, str) and k.startswith("__") and k.endswith("__") for k in d)


def flatten(obj: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested structure into ``{key: tensor}`` and a JSON-serialisable skeleton.

    Handles dicts (any hashable JSON-able keys, e.g. the ints of an optimiser's ``state``), lists,
    tuples, tensors, numpy arrays and JSON scalars; anything else raises ``TypeError``.
    """
    tensors: dict[str, torch.Tensor] = {}

    def key_for(path: list[str]) -> str:
        key = "/".join(path) or "root"
        base, n = key, 1
        while key in tensors:
            key, n = f"{base}~{n}", n + 1
        return key

    def enc(x: Any, path: list[str]) -> Any:
        if isinstance(x, torch.Tensor):
            key = key_for(path)
            # clone: safetensors refuses tensors that share memory, and the caller may keep training
            tensors[key] = x.detach().to("cpu", copy=True).contiguous()
            return {"__tensor__": key}
        if isinstance(x, np.ndarray):
            key = key_for(path)
            arr = x.astype(np.int64) if x.dtype.kind == "u" and x.dtype != np.uint8 else x
            tensors[key] = torch.from_numpy(np.ascontiguousarray(arr).copy())
            return {"__ndarray__": key, "dtype": str(x.dtype)}
        if isinstance(x, np.generic):
            return x.item()
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, tuple):
            return {"__tuple__": [enc(v, path + [str(i)]) for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [enc(v, path + [str(i)]) for i, v in enumerate(x)]
        if isinstance(x, dict):
            if all(isinstance(k, str) for k in x) and not _is_tagged(x):
                return {k: enc(v, path + [k]) for k, v in x.items()}
            return {"__dict__": [[enc(k, path), enc(v, path + [str(k)])] for k, v in x.items()]}
        raise TypeError(f"cannot store a {type(x).__name__} in a checkpoint (at {'/'.join(path) or 'root'})")

    return tensors, enc(obj, [])


def unflatten(tensors: dict[str, torch.Tensor], skeleton: Any) -> Any:
    """Inverse of :func:`flatten`."""

    def dec(x: Any) -> Any:
        if isinstance(x, list):
            return [dec(v) for v in x]
        if not isinstance(x, dict):
            return x
        if "__tensor__" in x:
            return tensors[x["__tensor__"]]
        if "__ndarray__" in x:
            return tensors[x["__ndarray__"]].numpy().astype(x["dtype"])
        if "__tuple__" in x:
            return tuple(dec(v) for v in x["__tuple__"])
        if "__dict__" in x:
            return {_hashable(dec(k)): dec(v) for k, v in x["__dict__"]}
        return {k: dec(v) for k, v in x.items()}

    return dec(skeleton)


def _hashable(x: Any) -> Any:
    return tuple(_hashable(v) for v in x) if isinstance(x, list) else x


# ---------------------------------------------------------------------------------------------
# random number generators
# ---------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """The states of every RNG training draws from: torch (CPU and CUDA), numpy and ``random``."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning("checkpoint has CUDA RNG states for %d devices, this machine has %d: not restored",
                        len(cuda), torch.cuda.device_count())


# ---------------------------------------------------------------------------------------------
# atomic folders
# ---------------------------------------------------------------------------------------------
def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; nothing more to do there
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(target: str | Path, fill: Callable[[Path], None]) -> Path:
    """Create folder ``target`` atomically: ``fill(tmp)`` writes into a temporary sibling folder,
    which replaces ``target`` only once it is complete and on disk."""
    target = Path(target)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    old = target.with_name(target.name + ".old")
    if old.exists() and target.exists():
        shutil.rmtree(old)  # leftover of a crash after the new checkpoint was in place
    for stale in [*parent.glob("ckpt.tmp-*"), *parent.glob(".ckpt.tmp-*")]:  # (the second: s2i.model.save's)
        shutil.rmtree(stale, ignore_errors=True)  # leftovers of interrupted writes: never complete
    tmp = Path(tempfile.mkdtemp(prefix="ckpt.tmp-", dir=parent))
    try:
        fill(tmp)
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    _fsync_dir(parent)
    shutil.rmtree(old, ignore_errors=True)
    return target


def resolve(path: str | Path) -> Path:
    """The checkpoint folder to read for ``path``: itself, or ``path.old`` left by a crash mid-replace."""
    path = Path(path)
    if path.is_dir():
        return path
    old = path.with_name(path.name + ".old")
    if old.is_dir():
        log.warning("%s is missing; using %s (a checkpoint write was interrupted)", path, old)
        return old
    raise CheckpointError(f"no checkpoint at {path}")


# ---------------------------------------------------------------------------------------------
# training checkpoints
# ---------------------------------------------------------------------------------------------
def save(target: str | Path, state: dict[str, Any], model: torch.nn.Module | None = None,
         extra: dict[str, Any] | None = None) -> Path:
    """Atomically write a checkpoint folder.

    Args:
        target: the folder to (re)place, e.g. ``RUN/last``.
        state: nested training state (optimiser ``state_dict()``, ``rng_state()``, epoch, step,
            configs ...); tensors go to safetensors, the rest to JSON.
        model: also write the model in the ``s2i.model.save`` format (loadable with ``s2i.load``).
        extra: free-form JSON stored with the model (``config.json``'s ``extra``).
    """
    from s2i import model as model_io

    def fill(tmp: Path) -> None:
        if model is not None:
            model_io.save(model, tmp, extra=extra)
        if state is not None:
            tensors, skeleton = flatten(state)
            save_file(tensors, str(tmp / STATE_TENSORS))
            text = json.dumps({"format": FORMAT, "version": VERSION, "state": skeleton})
            (tmp / STATE_JSON).write_text(text)

    return write_atomic(target, fill)


def load(path: str | Path) -> dict[str, Any]:
    """Read the training state written by :func:`save` (tensors on the CPU)."""
    folder = resolve(path)
    meta_path, tensor_path = folder / STATE_JSON, folder / STATE_TENSORS
    if not meta_path.is_file() or not tensor_path.is_file():
        raise CheckpointError(f"{folder} holds no training state ({STATE_JSON} + {STATE_TENSORS}); "
                              "is it a model folder rather than a run's last/ checkpoint?")
    meta = read_header(meta_path, FORMAT, VERSION, CheckpointError, "training state")
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{tensor_path} is truncated or corrupt ({exc}); resume from an earlier copy "
                              "or start the run afresh") from None
    return unflatten(tensors, meta["state"])
