import dataclasses

import pytest

from paperloop import ConfigError, TrainerConfig, load_config


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("max_epochs: 4\nlr: 0.5\nmax_grad_norm: 1.0\n")
    cfg = load_config(TrainerConfig, path, ["lr=0.25", "precision=bf16"])
    assert (cfg.max_epochs, cfg.lr, cfg.max_grad_norm, cfg.precision) == (4, 0.25, 1.0, "bf16")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0


@pytest.mark.parametrize("overrides, key", [
    (["learning_rate=0.1"], "learning_rate"),
    (["max_epochs=three"], "max_epochs"),
    (["max_epochs=-1"], "max_epochs"),
    (["batch_size=0"], "batch_size"),
    (["precision=fp8"], "precision"),
    (["lr"], "lr"),
])
def test_bad_override_names_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config(TrainerConfig, None, overrides)
    assert str(e.value).startswith(key)


def test_unknown_key_in_yaml_names_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("max_epoch: 3\n")
    with pytest.raises(ConfigError, match="^max_epoch"):
        load_config(TrainerConfig, path)


def test_direct_construction_is_checked_too():
    with pytest.raises(ConfigError, match="^grad_accum_steps"):
        TrainerConfig(grad_accum_steps=0)
