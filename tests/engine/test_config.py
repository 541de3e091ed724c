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


# ---- types: the annotations are the schema, for every field of every config class ----------------


@pytest.mark.parametrize("field, value, message", [
    ("batch_size", 2.5, "batch_size: must be an integer, got 2.5 (float)"),
    ("shuffle", "no", "shuffle: must be true or false, got 'no' (str)"),
    ("shuffle", 0, "shuffle: must be true or false, got 0 (int)"),  # a flag takes True/False only
    ("max_epochs", True, "max_epochs: must be an integer or null, got True (bool)"),  # and an int is not a bool
    ("lr", "1e-3", "lr: must be a finite number, got '1e-3' (str)"),
    ("lr", float("nan"), "lr: must be a finite number, got nan (float)"),
    ("weight_decay", float("inf"), "weight_decay: must be a finite number, got inf (float)"),
    ("max_grad_norm", float("nan"), "max_grad_norm: must be a finite number or null, got nan (float)"),
    ("max_steps", "100", "max_steps: must be an integer or null, got '100' (str)"),
    ("precision", 32, "precision: must be a string, got 32 (int)"),
    ("output_dir", ["a"], "output_dir: must be a string, got ['a'] (list)"),
])
def test_direct_construction_checks_every_type(field, value, message):
    with pytest.raises(ConfigError) as e:
        TrainerConfig(**{field: value})
    assert str(e.value) == message


def test_numbers_are_normalized_where_the_type_allows():
    import numpy as np

    cfg = TrainerConfig(lr=1, batch_size=np.int64(8), max_grad_norm=2)
    assert (cfg.lr, cfg.batch_size, cfg.max_grad_norm) == (1.0, 8, 2.0)
    assert type(cfg.lr) is float and type(cfg.batch_size) is int and type(cfg.max_grad_norm) is float


@pytest.mark.parametrize("source, key", [
    ("lr: [0.1, 0.2]\n", "lr"),  # a YAML list for a scalar key
    ("batch_size: {a: 1}\n", "batch_size"),
    ("max_grad_norm: .nan\n", "max_grad_norm"),
    ("lr: .inf\n", "lr"),
])
def test_wrong_types_in_yaml_name_the_key(tmp_path, source, key):
    path = tmp_path / "c.yaml"
    path.write_text(source)
    with pytest.raises(ConfigError, match=f"^{key}: "):
        load_config(TrainerConfig, path)


@pytest.mark.parametrize("override", ["lr=nan", "lr=inf", "lr=-inf", "max_grad_norm=nan"])
def test_non_finite_overrides_are_refused(override):
    with pytest.raises(ConfigError, match=f"^{override.split('=')[0]}: must be a finite number"):
        load_config(TrainerConfig, None, [override])


def test_a_subclass_field_is_checked_from_its_annotation_alone():
    from typing import Optional, Tuple

    @dataclasses.dataclass(frozen=True)
    class Paper(TrainerConfig):
        widths: Tuple[int, ...] = (8, 16)
        temperature: Optional[float] = None
        tag: str = "x"

    assert Paper(widths=[4]).widths == (4,)  # a list where a tuple is declared: as OmegaConf gives it
    for kwargs, message in [({"widths": (8, "16")}, "widths: must be a list of integers, got (8, '16') (tuple)"),
                            ({"widths": 8}, "widths: must be a list of integers, got 8 (int)"),
                            ({"temperature": "hot"}, "temperature: must be a finite number or null, got 'hot' (str)"),
                            ({"tag": None}, "tag: must be a string, got None (NoneType)")]:
        with pytest.raises(ConfigError) as e:
            Paper(**kwargs)
        assert str(e.value) == message
    with pytest.raises(ConfigError, match=r"^widths: must be a list of integers, got \[8, 2.5\]$"):
        load_config(Paper, None, ["widths=[8,2.5]"])


@pytest.mark.parametrize("override, message", [
    ("models=cnn", "models: must be a list of strings, got 'cnn': write models=[cnn] "
                   "(the default: models=[logistic,mlp,cnn,gru])"),
    ("models=resnet", "models: must be a non-empty list from ['cnn', 'gru', 'logistic', 'mlp'], got ['resnet']"),
    ("shuffled=true", "shuffled: must be a list of true/false values, got True: write shuffled=[true] "
                      "(the default: shuffled=[false,true])"),
    ("shuffled=maybe", "shuffled: must be a list of true/false values, got 'maybe'"),
    ("lr=abc", "lr: must be a finite number, got 'abc'"),
    ("threads=[1]", "threads: must be an integer, got [1]"),
])
def test_a_value_of_the_wrong_shape_is_said_in_our_words_with_what_to_write(override, message):
    """Not OmegaConf's "Invalid value assigned: str is not a TupleConfig, ListConfig, list, or tuple" (mnist1d's
    `paperloop run mnist1d models=cnn`); a paper's own check names the values it takes."""
    from typing import Tuple

    names = ("logistic", "mlp", "cnn", "gru")

    @dataclasses.dataclass(frozen=True)
    class Config(TrainerConfig):
        models: Tuple[str, ...] = names
        shuffled: Tuple[bool, ...] = (False, True)
        threads: int = 1

        def __post_init__(self):
            super().__post_init__()
            if not self.models or not set(self.models) <= set(names):
                raise ConfigError(f"models: must be a non-empty list from {sorted(names)}, got {list(self.models)}")

    with pytest.raises(ConfigError) as e:
        load_config(Config, None, [override])
    assert str(e.value) == message


@pytest.mark.parametrize("text, words", [("- lr\n- 0.1\n", "holds a list"), ("5\n", "not a readable YAML config"),
                                         ("lr: [\n", "not a readable YAML config")])
def test_a_config_file_that_is_not_a_mapping_is_an_error_naming_the_file(tmp_path, text, words):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"^{path}: .*{words}"):
        load_config(TrainerConfig, path)
