"""common.config: dataclass -> argparse, FAST mode, saved config."""

import json
from dataclasses import dataclass, field
from typing import ClassVar

import pytest

from common import config as cfg


@dataclass
class ExampleConfig:
    """Train something small."""

    epochs: int = field(default=10, metadata={"help": "passes over the data"})
    learning_rate: float = field(default=1e-3, metadata={"help": "step size"})
    model: str = field(default="resnet_small", metadata={"help": "registry name"})
    scales: tuple[int, ...] = field(default=(16, 32), metadata={"help": "anchor sizes"})
    augment: bool = field(default=True, metadata={"help": "use augmentation"})
    out: str = field(default="runs/example", metadata={"help": "output folder"})
    fast: bool = field(default=False, metadata={"help": "tiny sizes"})
    FAST: ClassVar[dict] = {"epochs": 1, "model": "tiny"}


@pytest.fixture(autouse=True)
def no_fast_env(monkeypatch):
    monkeypatch.delenv(cfg.FAST_ENV, raising=False)


def test_defaults_and_types():
    config = cfg.parse_config(ExampleConfig, [])
    assert config == ExampleConfig()
    config = cfg.parse_config(ExampleConfig, ["--epochs", "3", "--learning-rate", "0.5",
                                              "--no-augment", "--scales", "8,16,24"])
    assert config.epochs == 3 and isinstance(config.epochs, int)
    assert config.learning_rate == 0.5
    assert config.augment is False
    assert config.scales == (8, 16, 24)


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        cfg.parse_config(ExampleConfig, ["--help"])
    text = capsys.readouterr().out
    for name, default in [("--epochs", "10"), ("--learning-rate", "0.001"),
                          ("--model", "'resnet_small'"), ("--augment", "True"), ("--out", "runs/example")]:
        assert name in text and default in text, (name, default)
    assert "FAST mode" in text


def test_fast_flag_and_env_apply_overrides_but_explicit_values_win(monkeypatch):
    config = cfg.parse_config(ExampleConfig, ["--fast"])
    assert (config.fast, config.epochs, config.model) == (True, 1, "tiny")
    config = cfg.parse_config(ExampleConfig, ["--fast", "--epochs", "4"])
    assert config.epochs == 4 and config.model == "tiny"
    monkeypatch.setenv(cfg.FAST_ENV, "1")
    assert cfg.fast_mode()
    config = cfg.parse_config(ExampleConfig, [])
    assert config.fast and config.epochs == 1


def test_bad_value_is_rejected_by_the_parser():
    with pytest.raises(SystemExit):
        cfg.parse_config(ExampleConfig, ["--epochs", "three"])
    with pytest.raises(ValueError):
        cfg.parse_config(int, [])


def test_save_config_and_metrics_round_trip(tmp_path):
    config = cfg.parse_config(ExampleConfig, ["--epochs", "2"])
    path = cfg.save_config(config, tmp_path / "run")
    saved = json.loads(path.read_text())
    assert saved["epochs"] == 2 and saved["scales"] == [16, 32]
    import numpy as np

    path = cfg.write_metrics({"val_accuracy": np.float32(0.5), "epochs": 2}, tmp_path)
    assert json.loads(path.read_text()) == {"epochs": 2, "val_accuracy": 0.5}
