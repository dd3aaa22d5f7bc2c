"""One config: validation, file round trips, generated CLI flags and their precedence."""

from __future__ import annotations

from dataclasses import fields

import pytest

from qlora_orpo.cli.train import build_parser, parse_args
from qlora_orpo.config import OrpoConfig
from qlora_orpo.core.errors import ConfigError

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
    cfg, _ = parse_args(["--no-eval-cache"])
    assert cfg.eval_cache is False


def test_gradient_checkpointing_is_an_auto_on_off_switch_that_still_reads_the_old_booleans(tmp_path):
    """It was a boolean: --gradient-checkpointing alone, --no-gradient-checkpointing and true/false in
    files (ours and TRL's) keep their meaning; the default is auto."""
    assert OrpoConfig().gradient_checkpointing == "auto"
    assert parse_args([])[0].gradient_checkpointing == "auto"
    assert parse_args(["--gradient-checkpointing"])[0].gradient_checkpointing == "on"
    assert parse_args(["--no-gradient-checkpointing"])[0].gradient_checkpointing == "off"
    assert parse_args(["--gradient-checkpointing", "auto"])[0].gradient_checkpointing == "auto"
    for value, want in ((True, "on"), (False, "off"), ("false", "off"), ("on", "on")):
        assert OrpoConfig(gradient_checkpointing=value).gradient_checkpointing == want
    config = tmp_path / "c.yaml"
    config.write_text("gradient_checkpointing: false\n")
    assert parse_args(["--config", str(config)])[0].gradient_checkpointing == "off"
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        OrpoConfig(gradient_checkpointing="sometimes")


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


# ---------------------------------------------------------------------------------------------
# Familiar keys (TRL / transformers, LLaMA-Factory, axolotl) and the prompt-length coupling
# ---------------------------------------------------------------------------------------------

TRL_YAML = """\
model_name_or_path: embedded
per_device_train_batch_size: 2
per_device_eval_batch_size: 8
gradient_accumulation_steps: 8
num_train_epochs: 2
max_steps: -1
learning_rate: 5.0e-6
lr_scheduler_type: constant_with_warmup
warmup_ratio: 0.05
logging_steps: 5
save_steps: 50
eval_steps: 25
save_total_limit: 3
report_to: [tensorboard]
optim: paged_adamw_8bit
bf16: true
gradient_checkpointing: true
max_length: 1024
max_prompt_length: 512
beta: 0.2
seed: 7
output_dir: out
run_name: trl-style
r: 8
lora_alpha: 16
lora_dropout: 0.0
target_modules: [q_proj, v_proj]
"""


def test_a_trl_style_yaml_is_accepted_with_one_warning_per_alias(tmp_path, capsys):
    from qlora_orpo.config import aliases as config_aliases

    config_aliases._warned.clear()
    path = tmp_path / "trl.yaml"
    path.write_text(TRL_YAML)
    cfg, _ = parse_args(["--config", str(path), "--seed", "9"])
    assert (cfg.batch_size, cfg.eval_batch_size, cfg.grad_accum, cfg.epochs, cfg.max_steps) == (2, 8, 8, 2.0, 0)
    assert (cfg.lr_scheduler, cfg.log_every, cfg.save_every, cfg.eval_every, cfg.save_total_limit) == (
        "constant", 5, 50, 25, 3)
    assert (cfg.report_to, cfg.optim, cfg.compute_dtype) == ("tensorboard", "paged_adamw8bit", "bfloat16")
    assert (cfg.lora_r, cfg.lora_targets, cfg.learning_rate, cfg.seed) == (8, "q_proj,v_proj", 5e-6, 9)
    err = capsys.readouterr().err
    for alias, field in (("per_device_train_batch_size", "batch_size"), ("logging_steps", "log_every"), ("r", "lora_r")):
        assert f"reading {alias!r} as {field!r}" in err
    assert "'learning_rate'" not in err  # our own names are not aliases
    parse_args(["--config", str(path)])
    assert "reading" not in capsys.readouterr().err  # once per alias per process


@pytest.mark.parametrize(
    "text, match",
    [
        ("per_device_train_batch_size: 2\ndo_magic: 1\n", "unknown config key 'do_magic'"),
        ("batch_size: 2\nper_device_train_batch_size: 4\n", "both set batch_size"),
        ("lora_rank: 8\noptimizer: adamw_torch\ncutoff_len: 100\nlora_target: all\n", None),
    ],
)
def test_alias_errors_name_the_file_and_key(tmp_path, text, match):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    if match is None:  # LLaMA-Factory / axolotl names
        cfg = OrpoConfig.from_file(path)
        assert (cfg.lora_r, cfg.optim, cfg.max_length, cfg.max_prompt_length, cfg.lora_targets) == (
            8, "adamw", 100, 50, "all-linear")
        return
    with pytest.raises(ConfigError, match=match) as info:
        OrpoConfig.from_file(path)
    assert str(path) in str(info.value)


def test_max_prompt_length_follows_max_length_unless_set():
    assert OrpoConfig().max_prompt_length == OrpoConfig().max_length // 2
    assert OrpoConfig(max_length=256).max_prompt_length == 128  # --max-length 256 alone is valid
    assert OrpoConfig(max_length=256, max_prompt_length=200).max_prompt_length == 200  # explicit wins
    with pytest.raises(ConfigError, match="max_prompt_length"):
        OrpoConfig(max_length=256, max_prompt_length=256)
    cfg, _ = parse_args(["--max-length", "256"])
    assert (cfg.max_length, cfg.max_prompt_length) == (256, 128)


def test_report_to_accepts_a_comma_list_and_names_a_bad_sink():
    assert OrpoConfig(report_to="TensorBoard, wandb").report_to == "tensorboard,wandb"
    assert OrpoConfig(report_to=[]).report_to == "none"
    with pytest.raises(ConfigError, match="report_to: 'mlflow'"):
        OrpoConfig(report_to="mlflow")
    with pytest.raises(ConfigError, match="save_total_limit"):
        OrpoConfig(save_total_limit=0)
