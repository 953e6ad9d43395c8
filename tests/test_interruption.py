"""Training survives being killed: SIGKILL at random moments, then ``--resume``, ends exactly where an
uninterrupted run ends, and no checkpoint on disk is ever half-written.

    bash scripts/test.sh -m slow tests/test_interruption.py -s     # prints the kill points

The slow test runs ``python -m s2i train CONFIG --resume`` as a subprocess on a tiny corpus (the
tone corpus of tests/test_train.py) and kills it with SIGKILL, at least 6 times: during start-up,
after a random training step, and the moment a checkpoint write has begun (``ckpt.tmp-*`` exists).
After every kill each ``last/`` and ``best/`` on disk must load (as a training state and as a model);
once the run completes, its weights, optimiser state and metrics must equal those of an uninterrupted
run of the same config (seeded, CPU, one thread).

The fast tests resume in-process from states a kill can leave behind (a half-written last line of
metrics.jsonl; stale temporary folders of an interrupted checkpoint write).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

import s2i
from s2i import checkpoint
from s2i.train import build_configs, run
from tests.test_train import make_tone_corpus

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def tiny_config(corpus: Path, out: Path, **keys) -> dict:
    """A YAML config: a 2-layer RNN with a VQ layer on MFCCs, a 2-block CNN on 16 px images, the triplet
    loss (random negatives: exercises the loss RNG), validation every epoch, one metric line a step."""
    cfg = {"preset": "rnn_vq_small", "data": str(corpus), "out_dir": str(out), "epochs": 3, "batch_size": 25,
           "lr": 3e-3, "min_lr": 1e-4, "loss": "triplet", "margin": 0.5, "log_every": 1, "tensorboard": False,
           "seed": 0, "workers": 0, "eval_every": 1,
           "model": {"name": "tiny", "embed_dim": 32, "text": None,
                     "speech": {"conv_channels": 16, "hidden_size": 32, "num_layers": 2, "attention_hidden": 16,
                                "vq_positions": "010", "vq_sizes": [0, 16, 0]},
                     "image": {"image_size": 16, "channels": [8, 16]}}}
    cfg.update(keys)
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from s2i.datasets.cache import build_caches

    root = make_tone_corpus(tmp_path_factory.mktemp("tones"), instances={"train": 2, "val": 1})
    build_caches(root, features=("mfcc",), image_features=("pixels",), image_size=16, progress=False)
    return root


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def check_checkpoints_load(out: Path) -> list[str]:
    """Every checkpoint folder on disk loads, as a training state (last/) and as a model (both)."""
    found = []
    for name in ("last", "best"):
        if not (out / name).exists() and not (out / f"{name}.old").exists():
            continue
        folder = checkpoint.resolve(out / name)
        s2i.load(folder)
        if name == "last":
            state = checkpoint.load(out / name)
            assert {"optimizer", "rng", "step", "epoch"} <= set(state)
        found.append(folder.name)
    return found


def same_run(a: Path, b: Path) -> None:
    """Two run folders hold the same final model, optimiser state, best model and metrics."""
    for name in ("last", "best"):
        wa, wb = load_file(str(a / name / "model.safetensors")), load_file(str(b / name / "model.safetensors"))
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-6, atol=1e-7, msg=f"{name}/{k}")
    oa, ob = checkpoint.load(a / "last")["optimizer"], checkpoint.load(b / "last")["optimizer"]
    for pid in oa["state"]:
        for k in oa["state"][pid]:
            torch.testing.assert_close(oa["state"][pid][k], ob["state"][pid][k], rtol=1e-6, atol=1e-7)
    ma, mb = lines(a / "metrics.jsonl"), lines(b / "metrics.jsonl")
    assert [r["val"] for r in ma if "val" in r] == [r["val"] for r in mb if "val" in r]
    ta = {r["step"]: r["loss"] for r in ma if "loss" in r}
    tb = {r["step"]: r["loss"] for r in mb if "loss" in r}
    assert sorted(ta) == sorted(tb)
    assert [ta[s] for s in sorted(ta)] == pytest.approx([tb[s] for s in sorted(tb)], rel=1e-5)
    assert ma[-1]["event"] == mb[-1]["event"] == "finished"


def leftovers(out: Path) -> list[str]:
    """Temporary folders of interrupted writes still in the run folder."""
    return sorted(p.name for p in out.iterdir() if ".tmp-" in p.name or ".old" in p.name) if out.is_dir() else []


# ---------------------------------------------------------------------------------------------
# SIGKILL at random points (slow)
# ---------------------------------------------------------------------------------------------
def _train(config: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "s2i", "train", str(config), "--resume"], cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for(proc: subprocess.Popen, condition, poll: float) -> bool:
    """Poll until ``condition()`` (True) or the process ends (False)."""
    while proc.poll() is None:
        try:
            if condition():
                return True
        except (OSError, ValueError):  # a file being replaced or a metric line being written
            pass
        time.sleep(poll)
    return False


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_equals_an_uninterrupted_run(corpus, tmp_path):
    seed = int(os.environ.get("S2I_KILL_SEED", time.time_ns() % 10_000))
    rng = np.random.default_rng(seed)
    full, cut = tmp_path / "full", tmp_path / "cut"
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "s2i", "train", str(write_config(tmp_path / "full.yaml",
                                                                                  tiny_config(corpus, full)))],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    baseline_s = time.perf_counter() - started
    total_steps = max(r["step"] for r in lines(full / "metrics.jsonl") if "loss" in r)

    config = write_config(tmp_path / "cut.yaml", tiny_config(corpus, cut))
    plan = ["startup", "step", "checkpoint-write", "step", "checkpoint-write", "step", "step"]
    kills, completed, log = 0, 0, []
    for attempt in range(20):
        strategy = plan[kills] if kills < len(plan) else "none"
        started_at = time.time()
        proc = _train(config)
        t0 = time.perf_counter()
        # where this run resumes: its metric lines beyond that step are new (it first drops the older ones)
        resumed = checkpoint.load(cut / "last")["step"] if (cut / "last").exists() or (cut / "last.old").exists() else 0
        if strategy == "startup":  # somewhere in imports / data loading / model building
            delay = rng.uniform(0.5, 0.5 * baseline_s)
            hit = _wait_for(proc, lambda: time.perf_counter() - t0 > delay, 0.05)
        elif strategy == "step":
            target = int(rng.integers(resumed + 1, total_steps)) if resumed + 1 < total_steps else total_steps
            metrics = cut / "metrics.jsonl"
            hit = _wait_for(proc, lambda: metrics.exists() and metrics.stat().st_mtime > started_at and any(
                r.get("step", 0) >= target and "loss" in r for r in lines(metrics)), 0.02)
            if hit:
                time.sleep(rng.uniform(0, 0.3))
        elif strategy == "checkpoint-write":  # the moment a checkpoint folder starts to be written
            hit = _wait_for(proc, lambda: cut.is_dir() and any(p.name.startswith("ckpt.tmp-") for p in cut.iterdir()),
                            0.001)
            if hit:
                time.sleep(rng.uniform(0, 0.05))
        else:
            hit = False
        if hit and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            found = check_checkpoints_load(cut)  # never half-written
            state = checkpoint.load(cut / "last")["step"] if found and "last" in found[0] else None
            log.append(f"kill {kills} ({strategy}{f' at step {target}' if strategy == 'step' else ''}) after "
                       f"{time.perf_counter() - t0:.1f} s: on disk {found}, "
                       f"last/ at step {state}, leftovers {leftovers(cut)}")
            continue
        stderr = proc.communicate(timeout=600)[1]
        assert proc.returncode == 0, stderr[-3000:]
        log.append(f"run {attempt + 1} ({strategy}) completed after {time.perf_counter() - t0:.1f} s: same as "
                   "the uninterrupted run")
        same_run(full, cut)  # every completed run, however often it was killed on the way
        assert not leftovers(cut), f"temporary folders left in the run folder: {leftovers(cut)}"
        completed += 1
        if kills >= len(plan):
            break
        # it completed before the plan's kills were all made: go on in a fresh folder
        cut = tmp_path / f"cut{attempt}"
        config = write_config(tmp_path / f"cut{attempt}.yaml", tiny_config(corpus, cut))
    print(f"\nkill seed {seed} (S2I_KILL_SEED), uninterrupted run {baseline_s:.1f} s, {total_steps} steps:\n  "
          + "\n  ".join(log))
    assert kills >= 5 and completed >= 1


# ---------------------------------------------------------------------------------------------
# what a kill can leave behind, resumed in-process (fast)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_step_run(corpus, tmp_path_factory) -> Path:
    """A run stopped after 2 steps (a mid-epoch checkpoint), kept as a template to copy."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    cfg = write_config(out.parent / "c.yaml", tiny_config(corpus, out, epochs=1, eval_every=0))
    result = run(*build_configs(str(cfg), ["max_steps=2"]))
    assert result.stopped_by == "max_steps"
    return out


def _copy(run_dir: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(run_dir, to)
    return to


def test_resume_after_a_half_written_metrics_line(two_step_run, tmp_path, corpus):
    out = _copy(two_step_run, tmp_path / "run")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "epoch": 0.7, "lo')  # the kill struck mid-line
    cfg = write_config(tmp_path / "c.yaml", tiny_config(corpus, out, epochs=1, eval_every=0))
    result = run(*build_configs(str(cfg), ["max_steps=3"]), resume=True)
    assert result.stopped_by == "max_steps" and checkpoint.load(out / "last")["step"] == 3
    steps = [r["step"] for r in lines(out / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3]


def test_resume_cleans_the_temporary_folder_of_an_interrupted_write(two_step_run, tmp_path, corpus):
    out = _copy(two_step_run, tmp_path / "run")
    (out / "ckpt.tmp-abc123").mkdir()  # what a kill inside checkpoint.save leaves
    (out / "ckpt.tmp-abc123" / "model.safetensors").write_bytes(b"\x00" * 10)
    cfg = write_config(tmp_path / "c.yaml", tiny_config(corpus, out, epochs=1, eval_every=0))
    run(*build_configs(str(cfg), ["max_steps=3"]), resume=True)
    assert checkpoint.load(out / "last")["step"] == 3
    assert not leftovers(out), leftovers(out)


def test_a_model_written_into_a_checkpoint_folder_makes_no_sibling_folders(two_step_run, tmp_path, monkeypatch):
    """checkpoint.save writes the model into its own fresh temporary folder: s2i.save must not add a
    temporary sibling of that folder (a kill would leave it behind, as nothing cleans ``.ckpt.tmp-*``)."""
    import safetensors.torch

    model = s2i.load(two_step_run / "last")
    target = tmp_path / "run" / "ckpt.tmp-xyz"
    target.mkdir(parents=True)
    s2i.save(model, target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["ckpt.tmp-xyz"]
    assert s2i.load(target) is not None

    def dies_half_way(tensors, path, metadata=None):  # the process dies while writing the weights
        Path(path).write_bytes(b"\x00" * 100)
        raise KeyboardInterrupt

    crashed = tmp_path / "run" / "ckpt.tmp-crash"
    crashed.mkdir()
    monkeypatch.setattr(safetensors.torch, "save_file", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        s2i.save(model, crashed)
    assert not (crashed / "config.json").exists()  # never a config beside incomplete weights
    assert sorted(p.name for p in target.parent.iterdir()) == ["ckpt.tmp-crash", "ckpt.tmp-xyz"]
