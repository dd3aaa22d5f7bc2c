"""One config: validation, file round trips, generated CLI flags and their precedence."""

from __future__ import annotations

from dataclasses import fields

import pytest

from qlora_orpo.cli.train import build_parser, parse_args
from qlora_orpo.config import OrpoConfig
from qlora_orpo.errors import ConfigError

REQUIRED_FIELDS = {
    "model", "data", "output_dir", "beta", "learning_rate", "max_steps", "epochs", "batch_size",
    "grad_accum", "max_length", "max_prompt_length", "lora_r", "lora_alpha", "lora_dropout",
    "lora_targets", "seed", "eval_fraction",
}


def test_every_field_has_help_and_the_required_names_exist():
    names = {f.name for f in fields(OrpoConfig)}
    assert REQUIRED_FIELDS <= names
    for f in fields(OrpoConfig):
        assert f.metadata.get("help"), f"{f.name} has no help text"
    assert OrpoConfig().beta == 0.1


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_round_trip_file_dataclass_file(tmp_path, suffix):
    cfg = OrpoConfig(beta=0.25, max_steps=7, lora_targets=["q_proj", "v_proj"], nll_over_prompt=True)
    first = cfg.to_file(tmp_path / f"a{suffix}")
    loaded = OrpoConfig.from_file(first)
    assert loaded == cfg
    assert loaded.lora_targets == "q_proj,v_proj"
    second = loaded.to_file(tmp_path / f"b{suffix}")
    assert first.read_text() == second.read_text()


def test_cli_flag_overrides_file_value_and_file_overrides_default(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("beta: 0.3\nmax_steps: 5\nlearning_rate: 1e-4\n")
    cfg, actions = parse_args(["--config", str(path), "--max-steps", "9", "--nll-over-prompt"])
    assert cfg.max_steps == 9  # flag beats file
    assert cfg.beta == 0.3  # file beats default
    assert cfg.learning_rate == 1e-4  # YAML's "1e-4" string coerced to float
    assert cfg.nll_over_prompt is True
    assert actions == {"config": str(path), "dry_run": False, "resume": False, "show_examples": 0}


def test_every_field_has_a_kebab_case_flag():
    flags = {opt for action in build_parser()._actions for opt in action.option_strings}
    for f in fields(OrpoConfig):
        assert "--" + f.name.replace("_", "-") in flags


def test_bool_flags_can_be_turned_off():
    cfg, _ = parse_args(["--no-gradient-checkpointing"])
    assert cfg.gradient_checkpointing is False


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"beta": -1.0}, "beta"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"eval_fraction": 1.5}, "eval_fraction"),
        ({"lora_r": 0}, "lora_r"),
        ({"batch_size": 0}, "batch_size"),
        ({"max_length": 100, "max_prompt_length": 100}, "max_prompt_length"),
        ({"step": "magic"}, "step"),
        ({"quant": "int3"}, "quant"),
        ({"device": "tpu"}, "device"),
        ({"max_steps": "many"}, "max_steps"),
        ({"lora_dropout": 0.95}, "lora_dropout"),
    ],
)
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        OrpoConfig(**kwargs)


def test_unknown_key_in_yaml_is_an_error_naming_the_key(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("betta: 0.2\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'betta'.*did you mean 'beta'"):
        OrpoConfig.from_file(path)
    with pytest.raises(ConfigError, match="betta"):
        parse_args(["--config", str(path)])


def test_bad_value_in_file_names_the_file_and_field(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"lora_r": -3}')
    with pytest.raises(ConfigError, match=r"bad\.json: lora_r"):
        OrpoConfig.from_file(path)


def test_unparseable_and_missing_config_files(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("beta: [1, 2\n")
    with pytest.raises(ConfigError, match="broken.yaml: cannot parse"):
        OrpoConfig.from_file(broken)
    with pytest.raises(ConfigError, match="not found"):
        OrpoConfig.from_file(tmp_path / "nope.yaml")


def test_unknown_cli_flag_exits_with_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--max-stepz", "3"])
    assert exc.value.code == 2
