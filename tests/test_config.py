from pathlib import Path

import pytest

from gptlab.config import PRESETS, ConfigError, GPTConfig, TrainConfig


def test_presets_build_and_match_gpt2_sizes():
    assert set(PRESETS) >= {"tiny", "gpt1", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"}
    xl = GPTConfig.from_preset("gpt2-xl")
    assert (xl.n_layer, xl.n_head, xl.n_embd, xl.block_size) == (48, 25, 1600, 1024)
    assert GPTConfig.from_preset("gpt1").norm_position == "post"


@pytest.mark.parametrize("bad", [dict(n_embd=30, n_head=4), dict(n_layer=0), dict(dropout=1.5),
                                 dict(pos_encoding="alibi"), dict(pos_encoding="rotary", n_embd=36, n_head=4),
                                 dict(activation="swish"), dict(vocab_size=-1),
                                 dict(n_embd=1 << 20, n_head=1)])
def test_invalid_model_config_is_rejected(bad):
    with pytest.raises(ConfigError):
        GPTConfig(**bad)


def test_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError, match="unknown preset 'gpt5'.*tiny"):
        GPTConfig.from_preset("gpt5")


@pytest.mark.parametrize("bad", [dict(lr=-1.0), dict(max_steps=0), dict(batch_size=-4), dict(min_lr=1.0),
                                 dict(precision="fp8"), dict(preset="nope"), dict(model={"n_head": 5}),
                                 dict(batch_size=10**7)])
def test_invalid_train_config_is_rejected(bad):
    with pytest.raises(ConfigError):
        TrainConfig(**bad)


def test_yaml_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("preset: tiny\nmax_steps: 7\nlr: 0.01\nmodel:\n  n_layer: 2\n")
    cfg = TrainConfig.from_sources(str(path), lr=0.02, batch_size=None)
    assert (cfg.max_steps, cfg.lr, cfg.model_config().n_layer) == (7, 0.02, 2)
    cfg = TrainConfig.from_sources(str(path), model={"n_head": 4})  # e.g. --n-head 4: merged into the file's model
    assert (cfg.model_config().n_layer, cfg.model_config().n_head) == (2, 4)
    path.write_text("max_stepz: 3\n")
    with pytest.raises(ConfigError, match="max_stepz"):
        TrainConfig.from_sources(str(path))


def test_fast_presets_bring_their_training_switches_and_flags_win():
    cfg = TrainConfig(preset="micro-fast")
    assert (cfg.optimizer, cfg.lr_schedule) == ("muon", "wsd")
    assert cfg.model_config().departures_from_gpt2() == {"pos_encoding": "rotary", "qk_norm": True,
                                                          "activation": "relu2", "tie_embeddings": False}
    assert TrainConfig(preset="tiny-fast", optimizer="adamw").optimizer == "adamw"
    plain = TrainConfig(preset="micro")
    assert (plain.optimizer, plain.lr_schedule) == ("adamw", "cosine")
    assert plain.model_config().departures_from_gpt2() == {}
    with pytest.raises(ConfigError, match="optimizer must be adamw or muon"):
        TrainConfig(optimizer="sgd")


def test_no_qk_norm_config_file_keeps_the_other_fast_switches():
    # configs/micro-fast-no-qk-norm.yaml, the induction-head and in-context-learning recipes' model
    path = Path(__file__).parent.parent / "configs" / "micro-fast-no-qk-norm.yaml"
    cfg = TrainConfig.from_sources(str(path), preset="micro-fast", model={"n_layer": 2, "n_head": 4})
    assert (cfg.optimizer, cfg.lr_schedule) == ("muon", "wsd")
    model = cfg.model_config()
    assert (model.n_layer, model.n_head) == (2, 4)
    assert model.departures_from_gpt2() == {"pos_encoding": "rotary", "activation": "relu2", "tie_embeddings": False}
