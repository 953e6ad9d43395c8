"""Speech, image and text encoders: padding invariance, masked BatchNorm, the seed's parameter counts,
tokenizers, image encoders at batch size 1."""
import copy

import pytest
import torch

from s2i.config import ConfigError, SpeechConfig, preset
from s2i.encoders.image import BackboneImageEncoder, LinearImageEncoder, SmallCNN, build_image_encoder
from s2i.encoders.pooling import AttentionPooling, MeanPooling
from s2i.encoders.rnn import bidirectional, reverse_within
from s2i.encoders.speech import (MaskedBatchNorm1d, ResDAVEnet, RNNSpeechEncoder, build_speech_encoder,
                                 parse_vq_positions)
from s2i.encoders.text import CHARACTERS, TextEncoder, Tokenizer, words

LENGTHS = [23, 64, 41, 1, 8]


def garbage_padded(x: torch.Tensor, lengths: list[int], extra: int = 0) -> torch.Tensor:
    """``x`` with ``extra`` more frames and everything beyond each length replaced by large noise."""
    x = torch.cat([x, torch.zeros(x.shape[0], extra, x.shape[2])], dim=1)
    mask = torch.arange(x.shape[1])[None, :] < torch.tensor(lengths)[:, None]
    return torch.where(mask[:, :, None], x, 100 * torch.randn_like(x))


def rnn(rnn_type: str = "lstm", **kw) -> RNNSpeechEncoder:
    return RNNSpeechEncoder(39, None, conv_channels=8, hidden_size=8, num_layers=2, rnn_type=rnn_type,
                            vq_positions="111", vq_sizes=(8, 8, 8), attention_hidden=4, **kw)


def resdavenet(shortcut: str = "conv", frontend: str = "conv", pooling: str = "mean") -> ResDAVEnet:
    return ResDAVEnet(40, 12, widths=(8, 8, 16, 16), blocks_per_stage=2, kernel_size=5, shortcut=shortcut,
                      frontend=frontend, conv_bias=shortcut == "maxpool", vq_positions="1101", vq_sizes=(8, 8, 0, 8),
                      pooling=pooling, attention_hidden=4)


ENCODERS = {
    "lstm": lambda: rnn("lstm"),
    "gru-mean": lambda: rnn("gru", pooling="mean"),
    "resdavenet-harwath": lambda: resdavenet("conv", "conv", "mean"),
    "resdavenet-seed": lambda: resdavenet("maxpool", "pointwise", "attention"),
}


def feature_dim(enc) -> int:
    return enc.conv.in_channels if isinstance(enc, RNNSpeechEncoder) else enc.front.in_channels


@pytest.mark.parametrize("name", ENCODERS)
def test_an_utterance_embeds_the_same_alone_and_padded_in_a_batch(name):
    torch.manual_seed(0)
    enc = ENCODERS[name]()
    x = torch.randn(len(LENGTHS), max(LENGTHS), feature_dim(enc))
    enc.train()(x, torch.tensor(LENGTHS))  # move BatchNorm statistics and codebooks away from their init
    enc.eval()
    batch = enc(garbage_padded(x, LENGTHS, extra=9), torch.tensor(LENGTHS))
    for i, n in enumerate(LENGTHS):
        alone = enc(x[i:i + 1, :n], torch.tensor([n]))
        torch.testing.assert_close(alone.embedding[0], batch.embedding[i], atol=2e-5, rtol=1e-4)
        m = int(alone.lengths[0])
        assert int(batch.lengths[i]) == m
        torch.testing.assert_close(alone.frames[0, :m], batch.frames[i, :m], atol=2e-5, rtol=1e-4)
        assert (batch.frames[i, m:] == 0).all()
        for layer, codes in alone.codes.items():
            k = int(alone.code_lengths[layer][0])
            assert torch.equal(codes[0, :k], batch.codes[layer][i, :k])
            assert (batch.codes[layer][i, k:] == -1).all()
    assert batch.embedding.shape == (len(LENGTHS), enc.out_dim)
    torch.testing.assert_close(batch.embedding.norm(dim=1), torch.ones(len(LENGTHS)))


@pytest.mark.parametrize("name", ENCODERS)
def test_training_step_ignores_padding(name):
    """Train mode: BatchNorm and VQ statistics use valid frames only, so more padding changes nothing."""
    torch.manual_seed(0)
    a = ENCODERS[name]().train()
    b = copy.deepcopy(a)
    x = torch.randn(len(LENGTHS), max(LENGTHS), feature_dim(a))
    out_a = a(garbage_padded(x, LENGTHS), torch.tensor(LENGTHS))
    out_b = b(garbage_padded(x, LENGTHS, extra=13), torch.tensor(LENGTHS))
    torch.testing.assert_close(out_a.embedding, out_b.embedding, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out_a.vq_loss, out_b.vq_loss)
    for (name_a, buf_a), (_, buf_b) in zip(a.named_buffers(), b.named_buffers()):
        torch.testing.assert_close(buf_a, buf_b, atol=1e-5, rtol=1e-4, msg=name_a)
    assert out_a.vq_loss > 0 and set(out_a.vq_stats) == set(a.vq)


def test_masked_batchnorm_equals_batchnorm_on_valid_frames():
    torch.manual_seed(0)
    lengths = [5, 9, 2]
    x = garbage_padded(torch.randn(3, 9, 4), lengths).transpose(1, 2)  # (B, C, T)
    mask = torch.arange(9)[None, :] < torch.tensor(lengths)[:, None]
    mbn, bn = MaskedBatchNorm1d(4), torch.nn.BatchNorm1d(4)
    valid = torch.cat([x[i, :, :n] for i, n in enumerate(lengths)], dim=1)[None]  # (1, C, sum)
    y, ref = mbn(x, mask), bn(valid)
    torch.testing.assert_close(torch.cat([y[i, :, :n] for i, n in enumerate(lengths)], dim=1)[None], ref)
    assert (y.transpose(1, 2)[~mask] == 0).all()
    torch.testing.assert_close(mbn.running_mean, bn.running_mean)
    torch.testing.assert_close(mbn.running_var, bn.running_var)
    assert set(dict(mbn.named_buffers())) == set(dict(bn.named_buffers()))
    mbn.eval(), bn.eval()
    torch.testing.assert_close(mbn(x, mask)[0, :, :5], bn(x[:1, :, :5])[0])


def test_frame_counts():
    enc = rnn().eval()
    out = enc(torch.randn(3, 50, 39), torch.tensor([50, 6, 3]))
    assert out.lengths.tolist() == [(50 - 6) // 2 + 1, 1, 1]  # floor((l - k) / s) + 1, at least 1
    enc = resdavenet().eval()
    out = enc(torch.randn(2, 33, 40), torch.tensor([33, 8]))
    assert out.lengths.tolist() == [5, 1]  # ceil(l / 2) per stage: 33 -> 17 -> 9 -> 5; 8 -> 4 -> 2 -> 1
    assert enc.strides == [1, 2, 4, 8]


def test_pooling_gives_padding_no_weight():
    torch.manual_seed(0)
    frames, lengths = garbage_padded(torch.randn(2, 7, 6), [7, 3]), torch.tensor([7, 3])
    for pool in (AttentionPooling(6, 5, heads=2), MeanPooling(6)):
        pooled = pool(frames, lengths)
        torch.testing.assert_close(pooled[1], pool(frames[1:, :3], torch.tensor([3]))[0])
        assert pooled.shape == (2, pool.out_dim)
    torch.testing.assert_close(MeanPooling(6)(frames, lengths)[1], frames[1, :3].mean(0))
    att = AttentionPooling(6, 5)
    for layer in (att.heads[0][0], att.heads[0][2]):  # both layers orthogonally initialised (seed: only one)
        w = layer.weight if layer.weight.shape[0] <= layer.weight.shape[1] else layer.weight.t()
        torch.testing.assert_close(w @ w.t(), torch.eye(min(w.shape)), atol=1e-5, rtol=0)


def test_vq_positions_are_checked():
    assert parse_vq_positions("01100", (0, 128, 2048, 0, 0), 5) == {1: 128, 2: 2048}
    with pytest.raises(ConfigError, match="positions"):
        parse_vq_positions("000001", (0,) * 6, 5)
    with pytest.raises(ConfigError, match="one codebook size"):
        parse_vq_positions("011", (8,), 5)
    with pytest.raises(ConfigError, match="give it a codebook size"):
        parse_vq_positions("01", (8, 0), 5)
    with pytest.raises(ConfigError, match="0s and 1s"):
        parse_vq_positions("0x1", (0, 0, 1), 5)


# The seed's caption/image encoder sizes (seed-spec §1.3, counted by running the original code).
SEED_PARAMS = {"merkx2021_rnn": 85_017_408, "merkx2022_rnn_vq": 93_930_304, "merkx2021_conv": 44_939_776,
               "merkx2021_conv_vq": 45_726_208}
SEED_IMAGE_PARAMS = {2048: 4_196_352, 1024: 2_098_176}


@pytest.mark.parametrize("name", SEED_PARAMS)
def test_parameter_counts_match_the_seed(name):
    """Exact, except that the seed stored each codebook twice as nn.Parameters (the codebook and its
    EMA sum, K x D each) where ours are buffers: those 2 x K x D numbers are counted back in."""
    cfg, _ = preset(name)
    with torch.device("meta"):
        speech = build_speech_encoder(cfg.speech, cfg.embed_dim)
        image = build_image_encoder(cfg.image, cfg.embed_dim)
    params = sum(p.numel() for p in speech.parameters())
    codebooks = sum(vq.codebook.numel() for vq in speech.vq.values())
    assert params + 2 * codebooks == SEED_PARAMS[name]
    assert sum(p.numel() for p in image.parameters()) == SEED_IMAGE_PARAMS[cfg.embed_dim]
    assert [vq.codebook_size for vq in speech.vq.values()] == [k for k in cfg.speech.vq_sizes if k]


def test_small_presets_build():
    for name in ("rnn_small", "rnn_vq_small", "resdavenet_vq_small", "harwath2020_resdavenet_vq"):
        cfg, _ = preset(name)
        with torch.device("meta"):
            enc = build_speech_encoder(cfg.speech, cfg.embed_dim)
        assert enc.out_dim == cfg.embed_dim
    with pytest.raises(ConfigError, match="arch"):
        build_speech_encoder(SpeechConfig(arch="transformer"))
    with pytest.raises(ConfigError, match="features"):
        build_speech_encoder(SpeechConfig(features="wav2vec"))


# ---------------------------------------------------------------------------------------------------- text
def test_word_tokenizer_round_trip_and_unknown_words():
    texts = ["A red circle, above a BLUE square.", "the cat's hat!", "a red hat"]
    tok = Tokenizer.from_texts(texts, "word")
    assert tok.vocab[:2] == ["<pad>", "<unk>"] and tok.vocab[2:5] == ["a", "hat", "red"]  # by frequency, then alphabetically
    ids, lengths = tok.encode(texts + ["", "a purple circle"])
    assert lengths.tolist() == [7, 3, 3, 1, 3]
    for text, row, n in zip(texts, ids, lengths):
        assert tok.decode(row[:n]) == " ".join(words(text))
    assert words("the cat's hat!") == ["the", "cat's", "hat"]
    assert ids[3, 0] == 1 and ids[4, 1] == 1  # empty text -> one <unk>; unseen word -> <unk>
    assert (ids[1, 3:] == 0).all()  # padding
    assert Tokenizer.build_vocab(texts) == tok.vocab
    with pytest.raises(ConfigError, match="must start with"):
        Tokenizer(["a", "b"])


def test_char_tokenizer_maps_unknown_characters_to_unk_never_minus_one():
    tok = Tokenizer.characters(max_len=10)
    ids, lengths = tok.encode(["Héllo wörld, too long"])
    assert lengths.tolist() == [10] and ids.min() >= 0
    assert ids[0, 1] == 1 and tok.decode(ids[0, :1]) == "h"
    assert tok.decode(tok.encode(["abc 123!"])[0][0]) == "abc 123!"
    assert len(tok) == 2 + len(CHARACTERS)


def test_text_encoder_is_padding_invariant_and_normalised():
    torch.manual_seed(0)
    tok = Tokenizer.from_texts(["a red circle above a blue square", "a cat"])
    enc = TextEncoder(len(tok), 16, token_dim=8, hidden_size=6, num_layers=2).eval()
    ids, lengths = tok.encode(["a red circle above a blue square", "a cat"])
    both = enc(ids, lengths)
    alone = enc(*tok.encode(["a cat"]))
    torch.testing.assert_close(both[1], alone[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(both.norm(dim=1), torch.ones(2))
    assert [r.hidden_size for r in enc.rnns] == [6, 8]  # the last layer gives embed_dim // 2 per direction


def test_reverse_within_reverses_each_row_to_its_length_and_undoes_itself():
    x = torch.arange(8.0).reshape(2, 4, 1)
    lengths = torch.tensor([3, 1])
    assert reverse_within(x, lengths)[..., 0].tolist() == [[2.0, 1.0, 0.0, 3.0], [4.0, 5.0, 6.0, 7.0]]
    torch.testing.assert_close(reverse_within(reverse_within(x, lengths), lengths), x)


@pytest.mark.parametrize("rnn_type", [torch.nn.LSTM, torch.nn.GRU])
def test_bidirectional_without_packing_equals_packed_sequences(rnn_type):
    """The CPU's one-way passes give the packed run's outputs and gradients, zeros on padding."""
    torch.manual_seed(0)
    rnn = rnn_type(5, 4, batch_first=True, bidirectional=True)
    x, lengths = torch.randn(4, 7, 5), torch.tensor([7, 3, 5, 1])
    outs, grads = [], []
    for packed in (True, False):
        out = bidirectional(rnn, x, lengths, packed=packed)
        outs.append(out)
        grads.append(torch.autograd.grad((out * torch.linspace(-1, 1, 8)).sum(), list(rnn.parameters())))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-6, rtol=1e-5)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert outs[1][1, 3:].abs().max() == 0 and outs[1][3, 1:].abs().max() == 0
    with pytest.raises(ValueError, match="one-layer, bidirectional"):
        bidirectional(rnn_type(5, 4, batch_first=True), x, lengths)


# ---------------------------------------------------------------------------------------------------- images
def test_linear_image_encoder_batch_of_one():
    enc = LinearImageEncoder(2048, 32)
    out = enc(torch.randn(1, 2048))
    assert out.shape == (1, 32) and abs(float(out.detach().norm()) - 1) < 1e-5
    with pytest.raises(ValueError, match="2048"):
        enc(torch.randn(1, 3, 8, 8))


def test_small_cnn_map_and_vector():
    torch.manual_seed(0)
    enc = SmallCNN(16, (4, 8, 8, 8)).eval()
    images = torch.rand(1, 3, 128, 128)
    fmap = enc.forward_map(images)
    assert fmap.shape == (1, 16, 8, 8)
    torch.testing.assert_close(enc(images), torch.nn.functional.normalize(fmap.mean((2, 3)), dim=-1))
    enc.train()(torch.rand(1, 3, 128, 128)).sum().backward()  # trains at batch size 1
    with pytest.raises(ValueError, match="batch, 3"):
        enc(torch.rand(3, 128, 128))


def test_backbone_encoder_local_weights_and_freezing(tmp_path):
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None)
    save_file(reference.state_dict(), str(tmp_path / "r18.safetensors"))
    torch.save(reference.state_dict(), tmp_path / "r18.pth")
    for file in ("r18.safetensors", "r18.pth"):
        enc = BackboneImageEncoder(8, "resnet18", str(tmp_path / file), trainable_layers=1)
        torch.testing.assert_close(enc.trunk[0].weight, reference.conv1.weight)
    assert not any(p.requires_grad for p in enc.trunk[:7].parameters())
    assert all(p.requires_grad for p in enc.trunk[7].parameters())
    enc.train()
    assert not enc.trunk[1].training and enc.trunk[7].training  # frozen BatchNorm keeps its statistics
    fmap = enc.forward_map(torch.rand(1, 3, 64, 64))
    assert fmap.shape == (1, 8, 2, 2) and enc(torch.rand(1, 3, 64, 64)).shape == (1, 8)
    with pytest.raises(ConfigError, match="never downloaded"):
        BackboneImageEncoder(8, "resnet18", str(tmp_path / "missing.pth"))
    with pytest.raises(ConfigError, match="ResNet"):
        BackboneImageEncoder(8, "vit_b_16")


@pytest.mark.parametrize("name", ENCODERS)
def test_hidden_keeps_every_layer_before_its_vq(name):
    torch.manual_seed(0)
    enc = ENCODERS[name]().eval()
    x = torch.randn(len(LENGTHS), max(LENGTHS), feature_dim(enc))
    plain = enc(x, torch.tensor(LENGTHS))
    assert plain.hidden is None  # nothing kept unless asked
    out = enc(x, torch.tensor(LENGTHS), hidden=True)
    torch.testing.assert_close(out.embedding, plain.embedding)
    assert list(out.hidden) == [f"layer{p}" for p in range(len(enc.strides))]
    for name_, (h, lengths) in out.hidden.items():
        vq = f"vq{name_[5:]}"
        if vq in out.codes:
            # the activations the VQ layer quantised: each frame's code is its nearest codeword
            codebook = enc.vq[vq].codebook
            for b, n in enumerate(lengths.tolist()):
                nearest = torch.cdist(h[b, :n], codebook).argmin(-1)
                assert torch.equal(nearest, out.codes[vq][b, :n])
    last, last_lengths = out.hidden[f"layer{len(enc.strides) - 1}"]
    assert torch.equal(last_lengths, out.lengths)
