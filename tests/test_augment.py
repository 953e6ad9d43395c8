import math
import pickle

import numpy as np
import pytest
import torch

from s2i.datasets.augment import (
    Augment, AugmentError, add_noise, band_energy, from_spec, reverb, snr_db, speed, telephone,
)

SR = 16000


def _speechlike(seconds: float = 2.0, seed: int = 0) -> torch.Tensor:
    """Harmonics with a syllable-rate envelope and pauses: enough structure for the checks."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * SR)) / SR
    f0 = 120 + 20 * torch.sin(2 * math.pi * 0.7 * t)
    phase = 2 * math.pi * torch.cumsum(f0, 0) / SR
    voiced = sum(torch.sin(k * phase) / k for k in range(1, 20))
    envelope = torch.clamp(torch.sin(2 * math.pi * 3 * t), min=0)
    return (0.2 * voiced * envelope + 0.005 * torch.randn(t.shape, generator=g)).float()


def _peak_hz(wave: torch.Tensor) -> float:
    spectrum = torch.fft.rfft(wave).abs()
    return float(torch.fft.rfftfreq(len(wave), 1 / SR)[spectrum.argmax()])


@pytest.mark.parametrize("snr", [-5.0, 0.0, 10.0, 25.0])
@pytest.mark.parametrize("colour", ["white", "pink"])
def test_add_noise_hits_the_requested_snr(snr, colour):
    clean = _speechlike()
    noisy = add_noise(clean, snr, torch.Generator().manual_seed(1), colour=colour)
    assert noisy.shape == clean.shape
    assert snr_db(clean, noisy) == pytest.approx(snr, abs=0.01)


def test_babble_from_other_speech_and_reproducibility():
    clean, other = _speechlike(2.0, seed=0), _speechlike(0.7, seed=1)
    noisy = add_noise(clean, 3.0, noise=other)
    assert noisy.shape == clean.shape and snr_db(clean, noisy) == pytest.approx(3.0, abs=0.01)
    a = add_noise(clean, 5, torch.Generator().manual_seed(7))
    b = add_noise(clean, 5, torch.Generator().manual_seed(7))
    c = add_noise(clean, 5, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_pink_noise_is_louder_at_low_frequencies():
    silence_ish = torch.full((SR * 2,), 0.1)
    pink = add_noise(silence_ish, 0.0, torch.Generator().manual_seed(0), colour="pink") - silence_ish
    white = add_noise(silence_ish, 0.0, torch.Generator().manual_seed(0)) - silence_ish
    assert band_energy(pink, SR, 50, 500) > 5 * band_energy(pink, SR, 4000, 4450)
    assert band_energy(white, SR, 50, 500) == pytest.approx(band_energy(white, SR, 4000, 4450), rel=0.2)


def test_speed_changes_length_and_pitch():
    tone = torch.sin(2 * math.pi * 440 * torch.arange(SR) / SR)
    fast, slow = speed(tone, 1.1), speed(tone, 0.9)
    assert len(fast) == pytest.approx(SR / 1.1, abs=2) and len(slow) == pytest.approx(SR / 0.9, abs=2)
    assert _peak_hz(fast) == pytest.approx(484, abs=3) and _peak_hz(slow) == pytest.approx(396, abs=3)
    assert torch.equal(speed(tone, 1.0), tone)
    with pytest.raises(AugmentError):
        speed(tone, 3.0)


@pytest.mark.parametrize("codec", [False, True])
def test_telephone_keeps_only_the_phone_band(codec):
    noise = torch.randn(SR * 2, generator=torch.Generator().manual_seed(0)) * 0.1
    out = telephone(noise, SR, codec=codec)
    assert out.shape == noise.shape
    assert band_energy(noise, SR, 0, 300) > 0.03 and band_energy(noise, SR, 3400, 8000) > 0.5
    assert band_energy(out, SR, 0, 300) < 1e-3
    assert band_energy(out, SR, 3400, 8000) < 5e-3
    tone = 0.3 * torch.sin(2 * math.pi * 1000 * torch.arange(SR) / SR)
    kept = telephone(tone, SR, codec=codec)
    assert torch.nn.functional.cosine_similarity(kept[800:-800], tone[800:-800], dim=0) > 0.98


def test_reverb_keeps_length_and_level_and_decays_at_rt60():
    wave = _speechlike()
    wet = reverb(wave, 0.5, SR, torch.Generator().manual_seed(0))
    assert wet.shape == wave.shape
    assert float(wet.pow(2).mean()) == pytest.approx(float(wave.pow(2).mean()), rel=1e-3)
    assert not torch.allclose(wet, wave)
    impulse = torch.zeros(SR)
    impulse[0] = 1.0
    tail = reverb(impulse, 0.3, SR, torch.Generator().manual_seed(0))
    early, late = tail[1:800].pow(2).mean(), tail[int(0.28 * SR) : int(0.30 * SR)].pow(2).mean()
    assert 10 * math.log10(early / late) > 40


def test_augment_spec_fixed_condition_applies_every_time():
    clean = _speechlike()
    noisy = Augment("noise:10")(clean, torch.Generator().manual_seed(0))
    assert snr_db(clean, noisy) == pytest.approx(10, abs=0.01)
    phone = from_spec("telephone")(clean)
    assert torch.allclose(phone, telephone(clean, SR))
    assert from_spec("noise:10, telephone")(clean).shape == clean.shape
    # numpy input (what a reader of a file may have)
    assert Augment("noise:20")(clean.numpy()).shape == clean.shape


def test_augment_probabilities_ranges_and_seeding():
    clean = _speechlike(0.5)
    aug = Augment("noise:5..20@0.5")
    g = torch.Generator().manual_seed(0)
    outs = [aug(clean, g) for _ in range(200)]
    untouched = sum(torch.equal(o, clean) for o in outs)
    assert 70 < untouched < 130
    snrs = [snr_db(clean, o) for o in outs if not torch.equal(o, clean)]
    assert min(snrs) >= 5 - 0.01 and max(snrs) <= 20 + 0.01 and max(snrs) - min(snrs) > 8
    # same generator seed, same result
    train = Augment("train")
    a = train(clean, torch.Generator().manual_seed(3))
    b = train(clean, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    lengths = {len(train(clean, torch.Generator().manual_seed(s))) for s in range(30)}
    assert len(lengths) > 3  # speed perturbation changes the length
    assert Augment("speed:0.9..1.1", probability=0.0)(clean) is not None


def test_augment_is_picklable_for_dataloader_workers():
    aug = pickle.loads(pickle.dumps(Augment("train")))
    assert "noise" in repr(aug) and aug(_speechlike(0.3)).ndim == 1


@pytest.mark.parametrize("spec, message", [
    ("", "empty"),
    ("bogus", "unknown augmentation"),
    ("noise:abc", "cannot read"),
    ("noise@2", "outside 0-1"),
    ("noise:20..5", "downwards"),
    ("telephone:3", "no value"),
])
def test_bad_specs_say_what_is_accepted(spec, message):
    with pytest.raises(AugmentError, match=message):
        Augment(spec)
    assert issubclass(AugmentError, ValueError)


def test_empty_wave_is_refused():
    with pytest.raises(AugmentError, match="empty"):
        add_noise(np.zeros(0, np.float32), 10)


# ---------------------------------------------------------------------------------------------
# feature-space augmentation
# ---------------------------------------------------------------------------------------------
def _padded(lengths: list[int], dim: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), max(lengths), dim, generator=g)
    lengths_t = torch.tensor(lengths)
    x *= (torch.arange(max(lengths))[None, :] < lengths_t[:, None])[..., None]
    return x, lengths_t


def test_feature_augment_is_identity_in_eval_mode_and_at_unit_factors():
    from s2i.datasets.augment import FeatureAugment

    x, lengths = _padded([50, 30, 7])
    aug = FeatureAugment("specaugment").eval()
    y, out_lengths = aug(x, lengths)
    assert y is x and out_lengths is lengths
    y, out_lengths = FeatureAugment("vtlp:1.0,tempo:1.0,fmask:0,tmask:0")(x, lengths)
    assert torch.equal(out_lengths, lengths)
    torch.testing.assert_close(y, x, atol=1e-4, rtol=0)


def test_tempo_resamples_time_and_lengths():
    from s2i.datasets.augment import FeatureAugment

    ramp = torch.arange(40, dtype=torch.float32)[None, :, None].expand(2, 40, 3).clone()
    ramp[1, 20:] = 0
    lengths = torch.tensor([40, 20])
    slow, slow_lengths = FeatureAugment("tempo:0.5")(ramp, lengths)
    assert slow_lengths.tolist() == [80, 40]
    torch.testing.assert_close(slow[0, :79, 0], torch.arange(79, dtype=torch.float32) * 0.5)
    assert slow[1, 40:].abs().sum() == 0  # padding stays zero
    fast, fast_lengths = FeatureAugment("tempo:2.0")(ramp, lengths)
    assert fast_lengths.tolist() == [20, 10] and fast.shape[1] == 20
    torch.testing.assert_close(fast[0, :, 0], torch.arange(20, dtype=torch.float32) * 2)


def test_vtlp_moves_a_formant_the_right_way():
    from s2i.datasets.augment import FeatureAugment

    x = torch.zeros(1, 5, 40)
    x[..., 20] = 1.0  # one bright band
    longer, _ = FeatureAugment("vtlp:1.1")(x, torch.tensor([5]))  # each band reads 1.1x its frequency
    shorter, _ = FeatureAugment("vtlp:0.9")(x, torch.tensor([5]))
    assert longer[0, 0].argmax() < 20 < shorter[0, 0].argmax()
    assert longer[0, 0].sum() > 0.5 and shorter[0, 0].sum() > 0.5
    with pytest.raises(AugmentError, match="fbank"):
        FeatureAugment("vtlp", features="mfcc")


def test_masks_zero_exact_widths_and_keep_padding():
    from s2i.datasets.augment import FeatureAugment

    torch.manual_seed(0)
    x, lengths = _padded([100, 60, 8])
    x = x + 5 * (x != 0)  # no value is 0 by chance inside the utterances
    y, out_lengths = FeatureAugment("fmask:6")(x, lengths)
    zero_bands = (y == 0).all(dim=1).sum(dim=1)  # bands zero over every frame
    assert zero_bands.tolist() == [6, 6, 6]
    y, _ = FeatureAugment("tmask:10")(x, lengths)
    valid = torch.arange(100)[None, :] < lengths[:, None]
    zero_frames = ((y == 0).all(dim=2) & valid).sum(dim=1)
    assert zero_frames.tolist() == [10, 10, 2]  # capped at a quarter of the utterance
    assert (y[~valid] == 0).all()


def test_feature_augment_draws_per_utterance_from_the_global_rng():
    from s2i.datasets.augment import FeatureAugment

    x, lengths = _padded([60, 60, 60, 60])
    aug = FeatureAugment("specaugment")
    torch.manual_seed(3)
    a, la = aug(x, lengths)
    torch.manual_seed(3)
    b, lb = aug(x, lengths)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert len(set(la.tolist())) > 1  # different tempo per utterance
    with pytest.raises(AugmentError, match="unknown augmentation"):
        FeatureAugment("noise:10")


# ---------------------------------------------------------------------------------------------
# image batches
# ---------------------------------------------------------------------------------------------
def test_image_augment_is_identity_in_eval_mode_and_at_neutral_values():
    from s2i.datasets.augment import ImageAugment

    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert ImageAugment("affine").eval()(images) is images
    torch.testing.assert_close(ImageAugment("rotate:0,scale:1,shift:0")(images), images, atol=1e-5, rtol=0)


def test_image_augment_shift_and_zoom_move_content_where_expected():
    from s2i.datasets.augment import ImageAugment

    images = torch.zeros(1, 3, 64, 64)
    images[:, :, 30:34, 20:24] = 1.0  # a 4x4 block centred at pixel (31.5, 21.5); the image's centre is 31.5

    def centre(x: torch.Tensor) -> tuple[float, float]:
        w = x[0, 0]
        rows, cols = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
        return float((w * rows).sum() / w.sum()), float((w * cols).sum() / w.sum())

    # a shift of 1/8 of the side moves the block 8 pixels right and 8 down (both axes draw the same here)
    r, c = centre(ImageAugment("shift:0.125")(images))
    assert r == pytest.approx(39.5, abs=0.3) and c == pytest.approx(29.5, abs=0.3)
    # zoom 2 about the centre doubles the block's offset from the centre (-10 -> -20) and its area
    zoomed = ImageAugment("scale:2")(images)
    r, c = centre(zoomed)
    assert r == pytest.approx(31.5, abs=0.3) and c == pytest.approx(11.5, abs=0.3)
    assert float(zoomed[0, 0].sum()) == pytest.approx(4 * float(images[0, 0].sum()), rel=0.1)
    # pixels from outside repeat the border: a constant image stays constant whatever the jitter
    flat = torch.full((4, 3, 16, 16), 0.7)
    torch.testing.assert_close(ImageAugment("affine+elastic")(flat), flat)


def test_elastic_displaces_pixels_by_about_its_amplitude():
    from s2i.datasets.augment import ImageAugment

    side = 64
    ramp = (torch.arange(side, dtype=torch.float32) / (side - 1)).expand(2, 3, side, side).contiguous()
    torch.manual_seed(0)
    # on a horizontal ramp, each output pixel's value says which column it was read from
    moved = ImageAugment("elastic:0.01")(ramp)[:, 0, 8:-8, 8:-8] * (side - 1) - torch.arange(8, side - 8.0)
    std = float(moved.std())  # the field is 0.01 * 64 = 0.64 px at its grid points, smooth in between
    assert 0.3 < std < 0.9, std
    torch.testing.assert_close(ImageAugment("elastic:0")(ramp), ramp, atol=1e-5, rtol=0)


def test_image_augment_draws_per_image_from_the_global_rng():
    from s2i.datasets.augment import ImageAugment

    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)).expand(4, -1, -1, -1)
    aug = ImageAugment("affine")
    torch.manual_seed(5)
    first = aug(images)
    torch.manual_seed(5)
    assert torch.equal(aug(images), first)
    assert not torch.allclose(first[0], first[1])
    with pytest.raises(AugmentError, match="unknown augmentation 'flip'"):
        ImageAugment("flip")
