"""Checkpoints: nested state round-trips through safetensors + JSON (no pickle), RNG states restore,
and a crash at any point of a write leaves the previous checkpoint loadable."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from s2i import checkpoint
from s2i.model import CheckpointError

REPO = Path(__file__).resolve().parents[1]


def _optimizer_state() -> dict:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LSTM(3, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.8, 0.99))
    for _ in range(2):
        opt.zero_grad()
        out, _ = model[1](model[0](torch.randn(5, 4))[:, None])
        out.sum().backward()
        opt.step()
    return opt.state_dict()


def _assert_equal(a, b) -> None:
    assert type(a) is type(b) or (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _assert_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_equal(x, y)
    else:
        assert a == b or (a != a and b != b)  # NaN == NaN here


def test_flatten_round_trip_keeps_types_and_int_keys():
    state = {"optimizer": _optimizer_state(), "rng": checkpoint.rng_state(), "epoch": 3, "best": float("nan"),
             "shape": (2, 3), "names": ["a", None, True], "mixed": {1: "int key", "1": "str key"},
             "__tensor__": "a key that looks like a tag", "half": torch.arange(4, dtype=torch.float16),
             "empty": {}, "scalar": torch.tensor(2.5)}
    tensors, skeleton = checkpoint.flatten(state)
    json.dumps(skeleton)  # the skeleton is plain JSON
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    _assert_equal(checkpoint.unflatten(tensors, json.loads(json.dumps(skeleton))), state)
    with pytest.raises(TypeError, match="cannot store"):
        checkpoint.flatten({"bad": object()})


def test_save_and_load_never_pickle(tmp_path):
    state = {"optimizer": _optimizer_state(), "rng": checkpoint.rng_state(), "step": 7}
    target = checkpoint.save(tmp_path / "last", state)
    assert sorted(p.name for p in target.iterdir()) == sorted([checkpoint.STATE_TENSORS, checkpoint.STATE_JSON])
    loaded = checkpoint.load(target)
    _assert_equal(loaded, state)
    # the loaded optimiser state goes straight back into an optimiser
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LSTM(3, 2))
    opt = torch.optim.Adam(model.parameters())
    opt.load_state_dict(loaded["optimizer"])
    assert opt.param_groups[0]["betas"] == (0.8, 0.99)


def test_rng_state_restores_every_generator():
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    state = checkpoint.rng_state()
    tensors, skeleton = checkpoint.flatten(state)
    first = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    checkpoint.set_rng_state(checkpoint.unflatten(tensors, json.loads(json.dumps(skeleton))))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


def test_crash_while_writing_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "run" / "last"
    checkpoint.save(target, {"step": 1, "w": torch.ones(3)})

    def crash(tensors, filename, *a, **k):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(target, {"step": 2, "w": torch.zeros(3)})
    state = checkpoint.load(target)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert not list(target.parent.glob("ckpt.tmp-*"))  # the half-written folder is gone


def test_crash_between_the_two_renames_falls_back_to_the_old_folder(tmp_path, monkeypatch):
    target = tmp_path / "run" / "last"
    checkpoint.save(target, {"step": 1})
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # last -> last.old done; tmp -> last "crashes"
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(target, {"step": 2})
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)
    assert not target.exists() and (tmp_path / "run" / "last.old").is_dir()
    assert checkpoint.load(target)["step"] == 1  # resolve() finds last.old
    checkpoint.save(target, {"step": 3})  # the next write cleans up
    assert checkpoint.load(target)["step"] == 3
    assert sorted(p.name for p in target.parent.iterdir()) == ["last"]


def test_missing_or_foreign_checkpoints_raise_readable_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        checkpoint.load(tmp_path / "nothing")
    (tmp_path / "model").mkdir()
    with pytest.raises(CheckpointError, match="no training state"):
        checkpoint.load(tmp_path / "model")


WRITER = textwrap.dedent("""
    import sys, torch
    from s2i import checkpoint
    target = sys.argv[1]
    i = 0
    while True:
        i += 1
        checkpoint.save(target, {"i": i, "big": torch.full((1_000_000,), float(i)), "small": torch.full((3,), float(i))})
        print(i, flush=True)
""")


def test_sigkill_at_a_random_moment_leaves_a_complete_checkpoint(tmp_path):
    """A real crash: kill -9 a process that rewrites a 4 MB checkpoint in a loop."""
    target = tmp_path / "run" / "last"
    for delay in (0.2, 0.9):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], cwd=REPO, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "1"  # one complete write, then kill it mid-way through others
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = checkpoint.load(target)
        i = state["i"]
        assert i >= 1
        assert torch.equal(state["big"], torch.full((1_000_000,), float(i)))
        assert torch.equal(state["small"], torch.full((3,), float(i)))
