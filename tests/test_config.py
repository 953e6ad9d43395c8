import pytest

from s2i.config import (ALIASES, PRESETS, ConfigError, ModelConfig, TrainConfig, apply_overrides, from_dict,
                        preset, to_dict)


def test_presets_round_trip():
    for name in list(PRESETS) + list(ALIASES):
        model, train = preset(name)
        assert from_dict(ModelConfig, to_dict(model)) == model
        apply_overrides(TrainConfig(), train)


def test_unknown_key_and_wrong_type_are_refused():
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(TrainConfig, {"learning_rate": 1})
    with pytest.raises(ConfigError, match="expected a number"):
        from_dict(TrainConfig, {"lr": "fast"})
    with pytest.raises(ConfigError, match="expected an integer"):
        apply_overrides(TrainConfig(), ["epochs=2.5"])


def test_overrides_parse_values():
    cfg = apply_overrides(TrainConfig(), ["lr=1e-3", "bucket=false", "epochs=3"])
    assert cfg.lr == 1e-3 and cfg.bucket is False and cfg.epochs == 3
    m = apply_overrides(ModelConfig(), ["speech.vq_positions=01100", "speech.vq_sizes=[0,8,8,0,0]"])
    assert m.speech.vq_sizes == (0, 8, 8, 0, 0)


def test_unknown_preset_message():
    with pytest.raises(KeyError, match="unknown preset"):
        preset("nope")
