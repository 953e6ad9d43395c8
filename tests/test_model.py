"""The S2I model API, checkpoints (save/load round trip, every CheckpointError), warm starts."""
import dataclasses
import json

import numpy as np
import pytest
import torch

import s2i
from s2i import model as M
from s2i.config import ImageConfig, ModelConfig, SpeechConfig, TextConfig, VQConfig
from s2i.encoders.text import Tokenizer

TEXTS = ["a red circle above a blue square", "a green triangle", "two yellow stars"]


def tiny_config(vq_positions: str = "011", arch: str = "rnn", image: str = "cnn") -> ModelConfig:
    if arch == "rnn":
        speech = SpeechConfig(arch="rnn", features="mfcc", conv_channels=8, hidden_size=8, num_layers=2,
                              vq_positions=vq_positions, vq_sizes=(0, 8, 16)[: len(vq_positions)],
                              attention_hidden=4)
    else:
        speech = SpeechConfig(arch="resdavenet", features="fbank", widths=(8, 8, 16), blocks_per_stage=1,
                              kernel_size=5, vq_positions=vq_positions, vq_sizes=(0, 8, 16)[: len(vq_positions)],
                              conv_bias=False, pooling="mean", vq=VQConfig(kmeans_init=True))
    return ModelConfig("tiny", 16, speech, ImageConfig(image, in_dim=12, image_size=32, channels=(4, 8)),
                       TextConfig(embed_dim=8, hidden_size=6, vocab=Tokenizer.build_vocab(TEXTS)))


def waves(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [0.1 * torch.randn(n, generator=g) for n in (8000, 4000, 6400)]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return M.build_model(tiny_config()).eval()


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    M.save(model, path, extra={"epoch": 3})
    return path


def test_encode_shapes_and_normalisation(model):
    for out in (model.encode_speech(waves()), model.encode_image(torch.rand(2, 3, 32, 32)),
                model.encode_text(TEXTS)):
        torch.testing.assert_close(out.norm(dim=1), torch.ones(out.shape[0]))
        assert out.shape[1] == 16 and not out.requires_grad  # eval mode: plain tensors
    assert model.encode_speech(waves()[0]).shape == (1, 16)
    assert model.encode_text("a cat").shape == (1, 16)
    pil_like = [np.random.randint(0, 255, (40, 60, 3), dtype=np.uint8), np.random.rand(32, 32, 3)]
    assert model.encode_image(pil_like).shape == (2, 16)
    one = model.preprocess_image(pil_like[0])
    assert one.shape == (3, 32, 32) and 0 <= float(one.min()) and float(one.max()) <= 1
    torch.testing.assert_close(model.encode_image(one), model.encode_image(pil_like[:1]))
    assert model.image_map(torch.rand(1, 3, 32, 32)).shape == (1, 16, 8, 8)


def test_speech_is_padding_invariant_through_the_whole_model(model):
    w = waves()
    batch = model.encode_speech(w)
    for i, x in enumerate(w):
        torch.testing.assert_close(model.encode_speech(x)[0], batch[i], atol=2e-5, rtol=1e-4)
    padded = torch.zeros(3, 8000)
    for i, x in enumerate(w):
        padded[i, : len(x)] = x
    torch.testing.assert_close(model.encode_speech(padded, lengths=torch.tensor([8000, 4000, 6400])), batch)
    # another sample rate is resampled to 16 kHz
    assert model.encode_speech(w[0][::2], sample_rate=8000).shape == (1, 16)


def test_speech_output_and_units(model):
    feats, lengths = model.speech_features(waves())
    assert feats.shape[:2] == (3, int(lengths.max())) and feats.shape[2] == 39
    out = model.encode_speech_features(feats, lengths)
    assert set(out.codes) == {"vq1", "vq2"} and out.vq_loss.dim() == 0
    assert out.frames.shape[0] == 3 and out.lengths.tolist() == ((lengths - 6) // 2 + 1).tolist()
    units = model.units(waves()[0])
    assert set(units) == {"vq1", "vq2"}
    u = units["vq2"]
    assert u.frame_shift_s == pytest.approx(0.02) and u.codes.shape == (int(out.lengths[0]),)
    segments = u.segments()
    assert segments[0][1] == 0 and segments[-1][2] == pytest.approx(len(u.codes) * 0.02)
    assert sum(e - s for _, s, e in segments) == pytest.approx(len(u.codes) * 0.02)
    assert isinstance(model.units(waves()), list)


def test_training_mode_keeps_gradients():
    torch.manual_seed(0)
    m = M.build_model(tiny_config()).train()
    feats, lengths = m.speech_features(waves())
    out = m.encode_speech_features(feats, lengths)
    loss = (out.embedding @ m.encode_image(torch.rand(3, 3, 32, 32)).t()).sum() + out.vq_loss
    loss = loss + m.encode_text(TEXTS).sum() * m.logit_scale
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
    # units() never updates codebooks or BatchNorm statistics, and leaves the mode as it was
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.units(waves()[0])
    assert m.training and all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


def test_save_load_round_trip(model, saved):
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", "model.safetensors"]
    loaded = M.load(saved)
    assert loaded.config == model.config and not loaded.training
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    torch.testing.assert_close(loaded.encode_speech(waves()), model.encode_speech(waves()))
    torch.testing.assert_close(loaded.encode_text(TEXTS), model.encode_text(TEXTS))
    assert loaded.tokenizer.vocab == model.tokenizer.vocab
    config, extra = M.read_config(saved)
    assert extra == {"epoch": 3}
    assert json.loads((saved / "config.json").read_text())["format"] == "s2i-model"
    # re-saving keeps what lives beside the model and leaves no temporary folders
    (saved / "gallery.json").write_text("{}")
    M.save(loaded, saved)
    assert (saved / "gallery.json").exists()
    assert sorted(p.name for p in saved.parent.iterdir()) == ["tiny"]
    # a state dict given to build_model
    rebuilt = M.build_model(config, loaded.state_dict())
    torch.testing.assert_close(rebuilt.eval().encode_image(torch.rand(1, 3, 32, 32) * 0 + 0.5),
                               loaded.encode_image(torch.rand(1, 3, 32, 32) * 0 + 0.5))


def test_named_models(saved, monkeypatch, tmp_path):
    import shutil

    monkeypatch.setattr(M, "CHECKPOINTS", tmp_path)
    assert M.available_models() == []
    with pytest.raises(M.CheckpointError, match="no named models"):
        M.load("default")
    shutil.copytree(saved, tmp_path / "default")
    assert M.available_models() == ["default"] and s2i.available_models() == ["default"]
    assert isinstance(s2i.load("default"), M.S2I)
    with pytest.raises(M.CheckpointError, match=r"available models \['default'\]"):
        M.load("nope")


def _copy(saved, tmp_path):
    import shutil

    return shutil.copytree(saved, tmp_path / "copy")


def test_checkpoint_errors(saved, tmp_path):
    E = M.CheckpointError
    with pytest.raises(E, match="no checkpoint folder"):
        M.load(tmp_path / "missing")
    for name in ("model.safetensors", "config.json"):
        broken = _copy(saved, tmp_path)
        (broken / name).unlink()
        with pytest.raises(E, match=f"has no {name}"):
            M.load(broken)
        import shutil

        shutil.rmtree(broken)
    # truncated weights
    broken = _copy(saved, tmp_path)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(E, match="truncated or corrupt"):
        M.load(broken)
    (broken / "model.safetensors").write_bytes(data)
    # unknown config key, wrong format, not JSON
    meta = json.loads((broken / "config.json").read_text())
    meta["model"]["speech"]["hiddn_size"] = 3
    (broken / "config.json").write_text(json.dumps(meta))
    with pytest.raises(E, match=r"unknown key\(s\) \['hiddn_size'\]"):
        M.load(broken)
    (broken / "config.json").write_text(json.dumps({**meta, "format": "something"}))
    with pytest.raises(E, match="not an s2i model config"):
        M.load(broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(E, match="not valid JSON"):
        M.load(broken)
    # weights of another shape than the config builds: name the tensor and both shapes
    del meta["model"]["speech"]["hiddn_size"]
    meta["model"]["speech"]["attention_hidden"] = 5
    (broken / "config.json").write_text(json.dumps(meta))
    with pytest.raises(E, match=r"tensor 'speech\.pooling\.heads\.0\.0\.bias' has shape \(4,\) in the checkpoint "
                                r"but the config builds \(5,\)"):
        M.load(broken)
    meta["model"]["speech"]["attention_hidden"] = 4
    # weights missing from a config with more layers
    meta["model"]["speech"].update(hidden_size=8, num_layers=3, vq_positions="", vq_sizes=[])
    (broken / "config.json").write_text(json.dumps(meta))
    with pytest.raises(E, match=r"missing tensors \['speech\.rnns\.2"):
        M.load(broken)


def test_pickles_are_refused_without_being_read(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (marker.write_text, ("pwned",))

    import pickle

    for suffix in (".pt", ".pth", ".bin", ".ckpt"):
        (tmp_path / f"model{suffix}").write_bytes(pickle.dumps(Evil()))
        with pytest.raises(M.CheckpointError, match=r"pickle checkpoints are not loaded \(they can run code\); "
                                                    "convert with"):
            M.load(tmp_path / f"model{suffix}")
    with pytest.raises(M.CheckpointError, match="pickle checkpoints are not loaded"):
        M.load(tmp_path)  # a folder holding only pickles
    assert not marker.exists()


def test_warm_start_from_a_model_without_vq(tmp_path):
    """ResDAVEnet-VQ's {} -> {3}: every weight but the new codebook comes from the VQ-less model, and the
    codebook is initialised by k-means on the first training batch."""
    torch.manual_seed(0)
    plain = M.build_model(tiny_config("", arch="resdavenet"))
    with torch.no_grad():
        plain.speech.stages[0][0].conv1.weight.add_(1.0)
    M.save(plain, tmp_path / "plain")
    vq_model = M.build_model(tiny_config("001", arch="resdavenet"))
    assert not bool(vq_model.speech.vq["vq2"].initialized)  # kmeans_init in this config
    vq_model.speech.vq["vq2"].initialized.fill_(True)
    report = M.load_matching(vq_model, M.read_weights(tmp_path / "plain"))
    assert report.reinitialized_vq == ["speech.vq.vq2"] and not report.unexpected and not report.mismatched
    assert set(report.missing) == {f"speech.vq.vq2.{b}" for b in ("codebook", "ema_count", "ema_sum", "initialized")}
    assert "initialise by k-means" in str(report)
    torch.testing.assert_close(vq_model.speech.stages[0][0].conv1.weight, plain.speech.stages[0][0].conv1.weight)
    vq_model.train()
    feats, lengths = vq_model.speech_features(waves())
    out = vq_model.encode_speech_features(feats, lengths)
    assert bool(vq_model.speech.vq["vq2"].initialized)
    assert out.vq_stats["vq2"]["usage"] > 0.5  # k-means spreads the codes over the batch's frames
    # shape mismatches are reported, not raised
    other = M.build_model(dataclasses.replace(tiny_config("", arch="resdavenet"), embed_dim=32))
    report = M.load_matching(other, M.read_weights(tmp_path / "plain"))
    assert report.mismatched and report.mismatched[0][1] != report.mismatched[0][2]


def test_models_without_text_or_pixels_say_so(tmp_path):
    cfg = dataclasses.replace(tiny_config(image="linear"), text=None)
    m = M.build_model(cfg).eval()
    with pytest.raises(ValueError, match="no text encoder"):
        m.encode_text(["a cat"])
    with pytest.raises(ValueError, match="precomputed 12-d feature vectors"):
        m.encode_image([np.zeros((8, 8, 3), dtype=np.uint8)])
    assert m.encode_image(torch.randn(1, 12)).shape == (1, 16)
    assert m.image_map(torch.randn(1, 12)) is None
    with pytest.raises(Exception, match="text.vocab is empty"):
        M.build_model(dataclasses.replace(cfg, text=TextConfig()))


def test_search_method_ranks_by_dot_product():
    from s2i.model import S2I

    gallery = torch.nn.functional.normalize(torch.randn(20, 8), dim=1)
    scores, idx = S2I.search(gallery[[3, 7]], gallery, k=3)
    assert idx[:, 0].tolist() == [3, 7]
    assert torch.all(scores[:, :-1] >= scores[:, 1:])


def test_encode_speech_trims_leading_and_trailing_silence(model):
    from s2i.audio import trim_silence

    wave = waves()[0]
    padded = torch.cat([torch.zeros(8000), wave, torch.zeros(12000)])
    trimmed = trim_silence(padded)
    assert wave.shape[0] <= trimmed.shape[0] <= wave.shape[0] + 2 * (1600 + 400)  # margin + a frame each side
    torch.testing.assert_close(model.encode_speech(padded), model.encode_speech(trimmed, trim=False))
    assert not torch.allclose(model.encode_speech(padded), model.encode_speech(padded, trim=False))
