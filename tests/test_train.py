"""Training: LR schedules, a tiny end-to-end run, exact resume, SIGTERM, warm start, DDP = one process.

The tests make their own corpus (:func:`make_tone_corpus`): each image is two coloured halves (5 x 5
colour pairs) and its spoken captions are two tones whose pitches name the two colours, with random
pitch jitter, silences and noise. Small enough to train in seconds on a CPU, structured enough that
retrieval far above chance means the model learned the pairing.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from s2i import checkpoint
from s2i.config import ConfigError, ImageConfig, ModelConfig, SpeechConfig, TextConfig, TrainConfig
from s2i.datasets.corpus import PairedDataset
from s2i.train import build_configs, cyclic_cosine, global_batches, lr_at, run, train

REPO = Path(__file__).resolve().parents[1]
COLOURS = [(230, 30, 30), (30, 200, 30), (40, 40, 230), (230, 220, 30), (200, 40, 220)]
NAMES = ["red", "green", "blue", "yellow", "purple"]
TONES = [300.0, 600.0, 1200.0, 2400.0, 4800.0]
SR = 16000


def _tone_wave(a: int, b: int, rng: np.random.Generator) -> np.ndarray:
    pitch = 1 + rng.uniform(-0.03, 0.03)
    parts = [np.zeros(int(rng.uniform(0.0, 0.15) * SR))]
    for k in (a, b):
        t = np.arange(int(rng.uniform(0.2, 0.3) * SR)) / SR
        parts.append(0.3 * np.sin(2 * np.pi * TONES[k] * pitch * t))
    parts.append(np.zeros(int(rng.uniform(0.0, 0.15) * SR)))
    wave = np.concatenate(parts)
    return (wave + 0.01 * rng.standard_normal(len(wave))).astype(np.float32)


def _image(a: int, b: int, rng: np.random.Generator, size: int = 16) -> np.ndarray:
    img = np.zeros((size, size, 3), dtype=np.float32)
    img[:, : size // 2] = COLOURS[a]
    img[:, size // 2:] = COLOURS[b]
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_tone_corpus(root: Path, instances: dict[str, int] | None = None, captions: int = 2, seed: int = 0) -> Path:
    """Write a prepared corpus (docs/DESIGN.md format): per split, ``instances[split]`` images of every
    one of the 25 colour pairs, ``captions`` spoken captions each."""
    instances = instances or {"train": 4, "val": 1, "test": 1}
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "audio").mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, n in instances.items():
        lines = []
        for inst in range(n):
            for a in range(5):
                for b in range(5):
                    image_id = f"{split}-{inst}-{a}{b}"
                    Image.fromarray(_image(a, b, rng)).save(root / "images" / f"{image_id}.png")
                    for c in range(captions):
                        wave = _tone_wave(a, b, rng)
                        utt = f"{image_id}-{c}"
                        soundfile.write(root / "audio" / f"{utt}.wav", wave, SR)
                        lines.append({"utt_id": utt, "image_id": image_id, "image": f"{image_id}.png",
                                      "audio": f"{utt}.wav", "text": f"{NAMES[a]} and {NAMES[b]}",
                                      "speaker": "tone", "num_samples": len(wave)})
        rng.shuffle(lines)
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        splits[split] = {"utterances": len(lines), "images": 25 * n}
    meta = {"format": "s2i-corpus", "version": 1, "name": "tones", "sample_rate": SR, "splits": splits,
            "image_root": "images", "audio_root": "audio", "report": {}}
    (root / "corpus.json").write_text(json.dumps(meta))
    return root


def tiny_model(text: bool = False, vq: bool = False, image: str = "cnn") -> ModelConfig:
    speech = SpeechConfig(arch="rnn", features="mfcc", conv_channels=16, conv_kernel=6, conv_stride=2,
                          hidden_size=32, num_layers=2, pooling="attention", attention_hidden=16,
                          vq_positions="010" if vq else "", vq_sizes=(0, 16, 0) if vq else ())
    img = ImageConfig("cnn", image_size=16, channels=(8, 16)) if image == "cnn" else ImageConfig("linear", in_dim=512)
    return ModelConfig("tiny", 32, speech, img, TextConfig(arch="word", embed_dim=16, hidden_size=32) if text else None)


def tiny_train(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(data), out_dir=str(out), batch_size=25, epochs=6, lr=3e-3, min_lr=1e-4, schedule="cyclic",
                cycle_epochs=3.0, loss="hinge", margin=0.2, log_every=1, tensorboard=False, seed=0, workers=0)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from s2i.datasets.cache import build_caches

    root = make_tone_corpus(tmp_path_factory.mktemp("tones"))
    build_caches(root, features=("mfcc",), image_features=("pixels",), image_size=16, progress=False)
    return root


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


# ---------------------------------------------------------------------------------------------
# schedules
# ---------------------------------------------------------------------------------------------
def test_cyclic_cosine_min_max_min_over_one_cycle():
    cycle = 40
    lrs = [cyclic_cosine(s, 1e-6, 2e-4, cycle) for s in range(2 * cycle + 1)]
    assert lrs[0] == pytest.approx(1e-6)
    assert lrs[cycle // 2] == pytest.approx(2e-4)
    assert max(lrs) == pytest.approx(2e-4) and np.argmax(lrs) == cycle // 2
    assert lrs[cycle] == pytest.approx(1e-6)  # next cycle starts at min again
    assert lrs[cycle + cycle // 2] == pytest.approx(2e-4)
    assert all(a < b for a, b in zip(lrs[: cycle // 2], lrs[1: cycle // 2 + 1]))  # rising half


def test_warmup_cosine_and_constant():
    cfg = TrainConfig(schedule="cosine", lr=1e-3, min_lr=1e-5, warmup_steps=10, epochs=2)
    lrs = [lr_at(s, cfg, 50) for s in range(100)]
    assert lrs[9] == pytest.approx(1e-3) and lrs[0] == pytest.approx(1e-4)
    assert lrs[-1] == pytest.approx(1e-5, rel=0.05) and lrs[10] > lrs[50] > lrs[99]
    assert lr_at(77, TrainConfig(schedule="constant", lr=2e-4), 50) == 2e-4
    # a wall-clock budget: the decay follows the spent fraction of it when that is ahead of the steps
    assert lr_at(20, cfg, 50, time_progress=1.0) == pytest.approx(1e-5)
    assert lr_at(20, cfg, 50, time_progress=0.5) == pytest.approx((1e-3 + 1e-5) / 2)
    assert lr_at(20, cfg, 50, time_progress=0.01) == lrs[20]  # the steps are further on
    assert lr_at(5, cfg, 50, time_progress=0.9) == lrs[5]  # warm-up is counted in steps


def test_cycle_length_comes_from_the_real_number_of_batches(corpus, tmp_path):
    # 200 train utterances, one caption per image per batch, batch 64: the seed's int(200 / 64) = 3
    # would make the cycle drift; the real batch count is what the schedule uses.
    cfg = tiny_train(corpus, tmp_path / "run", batch_size=64, epochs=2, cycle_epochs=1.0, eval_every=0)
    from s2i.datasets.corpus import PairedDataset

    ds = PairedDataset(corpus, "train", features="mfcc")
    real = len(global_batches(ds, cfg, 0))
    assert real != len(ds) // 64
    train(cfg, tiny_model())
    lrs = [r["lr"] for r in _lines(tmp_path / "run" / "metrics.jsonl") if "lr" in r]
    assert len(lrs) == 2 * real
    expected = [cyclic_cosine(s, cfg.min_lr, cfg.lr, real) for s in range(2 * real)]
    assert lrs == pytest.approx(expected)
    assert lrs[0] == pytest.approx(cfg.min_lr) and lrs[real] == pytest.approx(cfg.min_lr)  # one cycle per epoch


def test_hard_negatives_put_captions_of_similar_images_in_one_batch(corpus, tmp_path):
    from s2i.config import ConfigError
    from s2i.datasets.corpus import PairedDataset, similar_images

    ds = PairedDataset(corpus, "train", features="mfcc")
    cfg = tiny_train(corpus, tmp_path / "hard", batch_size=8, epochs=1, eval_every=0, hard_negatives=1.0,
                     hard_negative_k=2)
    neighbours = similar_images([r["text"] for r in ds.utterances], ds.caption_image, 2)
    texts = {int(i): r["text"] for r, i in zip(ds.utterances, ds.caption_image)}
    shared = [len(set(texts[i].split()) & set(texts[int(neighbours[i][0])].split())) for i in texts]
    assert min(shared) >= 1  # "a and b": the nearest image shares a tone name
    hard, plain = global_batches(ds, cfg, 0, neighbours=neighbours), global_batches(ds, cfg, 0)
    assert hard != plain
    for batches in (hard, plain):
        assert sorted(i for b in batches for i in b) == list(range(len(ds)))
    result = run(cfg, tiny_model())  # the run builds its own neighbours from the transcripts
    assert result.finished
    with pytest.raises(ConfigError, match="hard_negatives"):
        dataclasses.replace(cfg, hard_negatives=1.5)


# ---------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------
def test_tiny_training_run_learns_far_above_chance(corpus, tmp_path):
    import s2i

    out = tmp_path / "run"
    t0 = time.perf_counter()
    best = train(tiny_train(corpus, out, epochs=6, tensorboard=True, grad_clip=5.0), tiny_model())
    seconds = time.perf_counter() - t0
    lines = _lines(out / "metrics.jsonl")
    vals = [r for r in lines if "val" in r]
    assert len(vals) == 6 and [v["epoch"] for v in vals] == list(range(1, 7))
    final = vals[-1]["val"]
    # 25 validation images: chance R@10 = 0.4, chance R@1 = 0.04
    assert final["speech_to_image"]["R@10"] > 0.8, final
    assert final["image_to_speech"]["R@10"] > 0.8, final
    assert final["speech_to_image"]["R@1"] > 0.2, final
    steps = [r for r in lines if "loss" in r]
    assert steps[0]["step"] == 1 and {"epoch", "loss", "lr", "retrieval_loss", "vq_loss", "grad_norm"} <= set(steps[0])
    assert np.mean([r["loss"] for r in steps[-8:]]) < np.mean([r["loss"] for r in steps[:8]])
    assert lines[-1]["event"] == "finished"
    # best/ is a plain model folder chosen by the validation score (the latest of equals); last/ holds
    # the full training state
    assert best == out / "best"
    model = s2i.load(best)
    meta = json.loads((best / "config.json").read_text())
    scores = [v["val"]["score"] for v in vals]
    assert meta["extra"]["val"]["score"] == max(scores)
    assert meta["extra"]["epoch"] == max(i for i, v in enumerate(scores) if v == max(scores))
    assert Path(meta["extra"]["data"]) == corpus.resolve()
    assert model.config.name == "tiny"
    state = checkpoint.load(out / "last")
    assert state["epoch"] == 6 and state["step"] == len(steps)
    assert list((out / "tb").iterdir())  # TensorBoard event file
    assert not [p for p in out.rglob("*") if p.suffix in (".pt", ".pth", ".pkl", ".bin", ".ckpt")]
    print(f"tiny run: {seconds:.1f} s, final val {final}")


def test_cpu_amp_trains_the_encoders_in_bf16(corpus, tmp_path, monkeypatch):
    """cpu_amp: the training steps' encoders run under bf16 autocast on the CPU (validation stays
    float32), and the run still learns."""
    from s2i.model import S2I

    seen: list[bool] = []
    encode_image = S2I.encode_image

    def spy(self, *args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return encode_image(self, *args, **kwargs)

    monkeypatch.setattr(S2I, "encode_image", spy)
    train(tiny_train(corpus, tmp_path / "off", epochs=1), tiny_model())
    assert seen and not any(seen)
    seen.clear()
    train(tiny_train(corpus, tmp_path / "amp", epochs=6, cpu_amp=True), tiny_model())
    assert True in seen and False in seen  # training steps in bf16, validation in float32
    final = [r for r in _lines(tmp_path / "amp" / "metrics.jsonl") if "val" in r][-1]["val"]
    assert final["speech_to_image"]["R@10"] > 0.8, final


def _same_state(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-6, atol=1e-7, msg=k)
    oa, ob = checkpoint.load(a)["optimizer"], checkpoint.load(b)["optimizer"]
    for pid in oa["state"]:
        for k in oa["state"][pid]:
            torch.testing.assert_close(oa["state"][pid][k], ob["state"][pid][k], rtol=1e-6, atol=1e-7)


def test_interrupted_then_resumed_equals_uninterrupted(corpus, tmp_path):
    model_cfg = tiny_model(vq=True, text=True)
    # triplet draws random negatives, feature and image augmentation random perturbations: all must resume exactly
    kw = dict(epochs=2, eval_every=1, loss="triplet", margin=0.5, feature_augment="tempo,fmask,tmask",
              image_augment="affine+elastic", text_loss_weight=0.5, speech_text_loss_weight=0.5)
    train(tiny_train(corpus, tmp_path / "full", **kw), model_cfg)
    # stop mid-epoch 1 (step 5 of 8), resume; then stop again right at the epoch boundary
    cfg = tiny_train(corpus, tmp_path / "cut", max_steps=5, **kw)
    train(cfg, model_cfg)
    assert checkpoint.load(tmp_path / "cut" / "last")["step"] == 5
    assert _lines(tmp_path / "cut" / "metrics.jsonl")[-1]["event"] == "stopped"
    train(tiny_train(corpus, tmp_path / "cut", max_steps=8, **kw), model_cfg, resume=True)
    assert checkpoint.load(tmp_path / "cut" / "last")["step"] == 8
    train(tiny_train(corpus, tmp_path / "cut", **kw), model_cfg, resume=True)
    _same_state(tmp_path / "full" / "last", tmp_path / "cut" / "last")
    # metrics.jsonl tells one history: every step once, the same losses, the same validation scores
    def history(run: str) -> list[dict]:
        return [{k: v for k, v in r.items() if k not in ("utt_per_s", "elapsed_s")} for r in _lines(tmp_path / run / "metrics.jsonl")
                if "event" not in r]

    assert history("full") == history("cut")
    assert all(r["speech_text_loss"] > 0 for r in history("full") if "loss" in r)
    # a fresh run never silently overwrites an existing one
    from s2i.config import ConfigError

    with pytest.raises(ConfigError, match="--resume"):
        train(tiny_train(corpus, tmp_path / "cut", **kw), model_cfg)


def test_sigterm_finishes_the_step_and_checkpoints(corpus, tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(_yaml_config(corpus, out, epochs=200, eval_every=0)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "s2i", "train", str(config)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(_lines(metrics)) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    state = checkpoint.load(out / "last")
    logged = [r for r in _lines(metrics) if "loss" in r]
    assert state["step"] == logged[-1]["step"] and 3 <= state["step"] < 200 * 8
    assert "SIGTERM received" in output and "--resume" in output
    # resuming continues from that step (in this process: a second interpreter start costs seconds)
    result = run(*build_configs(str(config), [f"max_steps={state['step'] + 2}"]), resume=True)
    assert not result.finished and result.stopped_by == "max_steps"
    resumed = checkpoint.load(out / "last")
    assert resumed["step"] == state["step"] + 2
    # the end line names the epoch the run would continue in: the next one when the two extra steps
    # finished an epoch (SIGTERM landed on one of its last two batches), as the checkpoint says
    assert _lines(metrics)[-1] == {"event": "stopped", "epoch": resumed["epoch"], "step": state["step"] + 2,
                                   "reason": "max_steps"}


def test_wall_clock_budget_stops_with_a_resumable_checkpoint(corpus, tmp_path):
    cfg = tiny_train(corpus, tmp_path / "budget", epochs=3, max_minutes=1e-6)  # spent after the first step
    result = run(cfg, tiny_model())
    assert not result.finished and result.stopped_by == "max_minutes"
    state = checkpoint.load(tmp_path / "budget" / "last")
    assert state["step"] == 1 and state["elapsed_s"] > 0
    lines = _lines(tmp_path / "budget" / "metrics.jsonl")
    assert lines[-1]["reason"] == "max_minutes" and lines[0]["elapsed_s"] > 0


def test_time_budget_finishes_the_run_validated(corpus, tmp_path):
    # budget_minutes, unlike max_minutes, ends the run: the partial epoch is validated, best/ kept,
    # and a resume has nothing left to do
    out = tmp_path / "budgeted"
    cfg = tiny_train(corpus, out, epochs=3, schedule="cosine", warmup_steps=0, budget_minutes=1e-6)
    result = run(cfg, tiny_model())
    assert result.finished and result.stopped_by is None and result.model == out / "best"
    lines = _lines(out / "metrics.jsonl")
    assert lines[-1] == {"event": "finished", "epoch": 1, "step": 1, "budget_spent": True}
    assert [r["epoch"] for r in lines if "val" in r] == [1]
    again = run(dataclasses.replace(cfg), tiny_model(), resume=True)
    assert again.finished and checkpoint.load(out / "last")["step"] == 1


def test_warm_start_without_vq_into_vq(corpus, tmp_path):
    # (the seed's unbucketed batches, loaded by a worker process)
    train(tiny_train(corpus, tmp_path / "plain", epochs=1, eval_every=0, bucket=False, workers=1), tiny_model())
    cfg = tiny_train(corpus, tmp_path / "vq", epochs=1, eval_every=0, init_from=str(tmp_path / "plain"), max_steps=1,
                     lr=1e-12, min_lr=1e-12)
    train(cfg, tiny_model(vq=True))
    plain = load_file(str(tmp_path / "plain" / "last" / "model.safetensors"))
    vq = load_file(str(tmp_path / "vq" / "last" / "model.safetensors"))
    shared = [k for k in plain if k in vq and plain[k].shape == vq[k].shape and "running" not in k
              and "num_batches" not in k]
    assert len(shared) > 10
    for k in shared:  # one step at lr 1e-12: still the warm-start weights
        torch.testing.assert_close(vq[k], plain[k], atol=1e-6, rtol=0, msg=k)
    assert any(k.startswith("speech.vq") or ".vq" in k for k in set(vq) - set(plain))


def test_distillation_pulls_the_warm_started_model_towards_its_teacher(corpus, tmp_path):
    import s2i
    from s2i.evaluate import embed_split

    train(tiny_train(corpus, tmp_path / "plain", epochs=2, eval_every=0), tiny_model())
    with pytest.raises(ConfigError, match="set init_from too"):
        run(tiny_train(corpus, tmp_path / "x", distill_weight=1.0), tiny_model(vq=True))
    teacher = s2i.load(tmp_path / "plain" / "last")
    ds = PairedDataset(corpus, "train", features="mfcc")
    want = embed_split(teacher, ds)[0]
    closeness = {}
    for weight in (0.0, 5.0):
        out = tmp_path / f"distil{weight}"
        train(tiny_train(corpus, out, epochs=2, eval_every=0, init_from=str(tmp_path / "plain"), distill_weight=weight),
              tiny_model(vq=True))
        steps = [r for r in _lines(out / "metrics.jsonl") if "step" in r and "loss" in r]
        assert all(("distill_loss" in r) == (weight > 0) for r in steps)
        got = embed_split(s2i.load(out / "last"), ds)[0]
        closeness[weight] = float((got * want).sum(1).mean())  # mean cosine to the teacher's embedding
    assert closeness[5.0] > closeness[0.0], closeness


def test_frozen_parts_keep_their_weights_and_batchnorm_statistics(corpus, tmp_path):
    with pytest.raises(ConfigError, match="unknown part.*audio"):
        tiny_train(corpus, tmp_path / "x", freeze="image,audio")
    with pytest.raises(ConfigError, match="nothing to train"):
        run(tiny_train(corpus, tmp_path / "x", freeze="speech,image,logit_scale"), tiny_model())
    train(tiny_train(corpus, tmp_path / "plain", epochs=1, eval_every=0), tiny_model())
    out = tmp_path / "frozen"
    train(tiny_train(corpus, out, epochs=2, eval_every=0, init_from=str(tmp_path / "plain"),
                     freeze="image, logit_scale"), tiny_model(vq=True))
    before = load_file(str(tmp_path / "plain" / "last" / "model.safetensors"))
    after = load_file(str(out / "last" / "model.safetensors"))
    image = [k for k in before if k.startswith("image.")]
    assert any("running_mean" in k for k in image)  # the CNN's BatchNorm: eval mode keeps its statistics
    for k in image + ["logit_scale"]:
        torch.testing.assert_close(after[k], before[k], atol=0, rtol=0, msg=k)
    assert any(not torch.equal(after[k], before[k]) for k in before if k.startswith("speech."))


# ---------------------------------------------------------------------------------------------
# configuration from the command line
# ---------------------------------------------------------------------------------------------
def _yaml_config(corpus: Path, out: Path, **train_keys) -> dict:
    m = tiny_model()
    keys = dict(data=str(corpus), out_dir=str(out), batch_size=25, epochs=2, lr=3e-3, log_every=1, tensorboard=False)
    keys.update(train_keys)
    return {"preset": "rnn_small", "model": {"name": "tiny", "embed_dim": 32, "text": None,
                                              "speech": {"conv_channels": 16, "hidden_size": 32, "num_layers": 2,
                                                         "attention_hidden": 16},
                                              "image": {"image_size": 16, "channels": list(m.image.channels)}},
            **keys}


def test_cli_takes_flags_before_or_after_the_overrides():
    import argparse

    from s2i.train import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for argv in (["rnn_small", "lr=1e-3", "--resume"], ["--resume", "rnn_small", "lr=1e-3"]):
        args = parser.parse_args(argv)
        assert args.config == "rnn_small"
        assert args.resume or "--resume" in args.overrides
        assert [o for o in args.overrides if o != "--resume"] == ["lr=1e-3"]


def test_build_configs_presets_yaml_and_overrides(tmp_path):
    cfg, model = build_configs("rnn", ["lr=1e-3", "model.speech.vq_positions=01100", "model.speech.vq_sizes=[0,128,2048,0,0]"])
    assert model.name == "merkx2021_rnn" and model.speech.hidden_size == 1024
    assert model.speech.vq_positions == "01100" and model.speech.vq_sizes == (0, 128, 2048, 0, 0)
    assert cfg.lr == 1e-3 and cfg.schedule == "cyclic" and cfg.out_dir == "runs/merkx2021_rnn"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_yaml_config(tmp_path, tmp_path / "o")))
    cfg, model = build_configs(str(path), ["epochs=3"])
    assert model.speech.hidden_size == 32 and model.speech.num_layers == 2 and model.text is None
    assert model.speech.rnn_type == "lstm"  # untouched keys keep the preset's values
    assert cfg.epochs == 3 and cfg.out_dir == str(tmp_path / "o")
    from s2i.config import ConfigError

    with pytest.raises(ConfigError):
        build_configs("rnn_small", ["no_such_key=1"])
    with pytest.raises(ConfigError):
        build_configs("no_such_preset", [])


# ---------------------------------------------------------------------------------------------
# DDP: two processes take the same steps as one process on the same global batch
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def feature_corpus(tmp_path_factory) -> Path:
    """The tone corpus with cached image features (a linear image encoder has no BatchNorm, whose
    per-process batch statistics would differ from one process's)."""
    from s2i.datasets.cache import build_image_feature_cache

    root = make_tone_corpus(tmp_path_factory.mktemp("tones_feat"), {"train": 1, "val": 1}, captions=4)
    for split in ("train",):
        build_image_feature_cache(root, split, "resnet18-center", random_init=True, progress=False)
    return root


def test_ddp_two_processes_equal_one(feature_corpus, tmp_path):
    # grad_clip far above the norm: no clipping, but the global gradient norm is logged every step
    cfg = _yaml_config(feature_corpus, tmp_path / "one", batch_size=20, epochs=1, max_steps=3, eval_every=0,
                       image_input="resnet18-center", loss="infonce", schedule="constant", grad_clip=1e6)
    cfg["model"]["image"] = {"arch": "linear", "in_dim": 512}
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(cfg))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    two = subprocess.Popen([*torchrun, "-m", "s2i", "train", str(config), f"out_dir={tmp_path / 'two'}"], cwd=REPO,
                           env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    one = run(*build_configs(str(config), []))  # meanwhile, one process in this one
    output, _ = two.communicate(timeout=300)
    assert one.stopped_by == "max_steps"
    assert two.returncode == 0, output[-3000:]
    assert checkpoint.load(tmp_path / "two" / "last")["world_size"] == 2
    wa = load_file(str(tmp_path / "one" / "last" / "model.safetensors"))
    wb = load_file(str(tmp_path / "two" / "last" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        if k.startswith("speech.pooling.") and k.endswith(".2.bias"):
            # the attention's output bias shifts every frame's score equally: the softmax over time
            # cancels it, its gradient is 0 up to rounding, and Adam turns rounding noise into +-lr steps
            continue
        # (3 Adam steps of lr 3e-3 move weights by up to 9e-3; rounding noise in near-zero gradients
        # can move a few by up to ~1e-4 differently)
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=5e-4, msg=k)
    # every step's loss (process 0 logs the global batch's) and global gradient norm are the same:
    # Adam is blind to the gradient's scale, the norm is not (summed, not averaged, across processes)
    one_steps = [r for r in _lines(tmp_path / "one" / "metrics.jsonl") if "loss" in r]
    two_steps = [r for r in _lines(tmp_path / "two" / "metrics.jsonl") if "loss" in r]
    assert len(one_steps) == len(two_steps) == 3
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in one_steps] == pytest.approx([r[key] for r in two_steps], rel=1e-4), key
    assert one_steps[0]["loss"] != pytest.approx(one_steps[2]["loss"], rel=1e-3)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_build(path):
    cfg, model_cfg = build_configs(str(path), [])
    assert Path(cfg.data).name == "synthetic-default" and cfg.out_dir.startswith("runs/")
    assert model_cfg.speech.features in ("mfcc", "fbank")


def test_image_augment_refuses_cached_image_features(feature_corpus, tmp_path):
    from s2i.config import ConfigError

    cfg = _yaml_config(feature_corpus, tmp_path / "run", epochs=1, image_input="resnet18-center", image_augment="affine")
    cfg["model"]["image"] = {"arch": "linear", "in_dim": 512}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="image_augment jitters pixels"):
        run(*build_configs(str(config), []))
