"""Stage configs: YAML + command-line overrides, and one clear error for every kind of mistake."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from rlhf.config import StageConfig, _help, check_positive, load_config, parse_config, public_config
from rlhf.errors import ConfigError


@dataclass
class ToyConfig(StageConfig):
    """A toy stage."""

    learning_rate: float = _help("lr", default=1e-3)
    batch_size: int = _help("batch", default=8)
    model: str | None = _help("model", default=None)
    tags: list[str] = _help("tags", default_factory=list)
    hub_token: str | None = _help("a secret", default=None)

    def validate(self) -> None:
        check_positive(self, "batch_size")


def test_yaml_then_cli_override_precedence(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("learning_rate: 5.0e-4\nbatch_size: 4\ntags: [a, b]\n")
    cfg = parse_config(ToyConfig, ["--config", str(cfg_file), "--batch_size", "2", "--resume"])
    assert cfg.learning_rate == 5e-4 and cfg.batch_size == 2 and cfg.resume is True and cfg.tags == ["a", "b"]
    assert parse_config(ToyConfig, ["--resume", "false"]).resume is False


def test_unknown_yaml_field_names_file_line_and_known_fields(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("batch_size: 4\n\nlearnin_rate: 1\n")
    with pytest.raises(ConfigError, match=rf"{cfg_file}:3: unknown field 'learnin_rate' for ToyConfig \(known: .*learning_rate"):
        load_config(ToyConfig, cfg_file)


def test_wrong_type_names_file_line_and_expected_type(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("seed: 1\nbatch_size: lots\n")
    with pytest.raises(ConfigError, match=rf"{cfg_file}:2: field 'batch_size': got 'lots', expected an integer"):
        load_config(ToyConfig, cfg_file)
    with pytest.raises(ConfigError, match=r"--batch_size: got '2.5', expected an integer"):
        parse_config(ToyConfig, ["--batch_size", "2.5"])


@pytest.mark.parametrize("value", ["0", "-3"])
def test_zero_or_negative_batch_size_is_refused(value):
    with pytest.raises(ConfigError, match=f"batch_size must be > 0, got {value}"):
        parse_config(ToyConfig, ["--batch_size", value])


def test_broken_yaml_and_missing_file_are_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match=rf"{bad}:\d+: invalid YAML"):
        load_config(ToyConfig, bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(ToyConfig, tmp_path / "nope.yaml")


def test_secrets_and_run_flags_never_reach_the_stored_config_and_fingerprint_ignores_run_flags():
    """An entry's recorded config carries no secret and no machine path: the registry folder and the resume/reuse
    flags of the run that made it are left out (a moved or shared registry stays clean)."""
    cfg = ToyConfig(hub_token="hf_secret", registry="/home/someone/runs", resume=True)
    stored = public_config(cfg)
    assert "hub_token" not in stored
    assert not {"registry", "resume", "reuse"} & set(stored) and "batch_size" in stored
    assert ToyConfig(resume=True, reuse=True).fingerprint() == ToyConfig().fingerprint()
    assert ToyConfig(batch_size=3).fingerprint() != ToyConfig().fingerprint()
