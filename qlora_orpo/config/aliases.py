"""Config keys of the tools users come from (TRL/transformers, LLaMA-Factory, axolotl) read as ours.

A config file may name a field by its TRL ``TrainingArguments``/``ORPOConfig`` name
(``per_device_train_batch_size``), LLaMA-Factory's (``lora_rank``, ``cutoff_len``) or
axolotl's (``micro_batch_size``, ``sequence_len``); :func:`normalise_keys` renames each to our
field, translating values where the vocabularies differ (``optim: adamw_torch`` -> ``adamw``),
and says so once per alias per process. An unknown key stays an error, and naming one field
twice (ours and an alias) is an error too, since which should win is a guess.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..core.errors import ConfigError

# alias -> our field. Keys that are already our names (learning_rate, beta, seed, max_length...)
# need no entry. The README's alias table is this dict.
KEY_ALIASES: dict[str, str] = {
    # TRL / transformers TrainingArguments
    "per_device_train_batch_size": "batch_size",
    "per_device_eval_batch_size": "eval_batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "num_train_epochs": "epochs",
    "lr_scheduler_type": "lr_scheduler",
    "logging_steps": "log_every",
    "save_steps": "save_every",
    "eval_steps": "eval_every",
    "model_name_or_path": "model",
    "r": "lora_r",
    "target_modules": "lora_targets",
    "bf16": "compute_dtype",
    "fp16": "compute_dtype",
    # LLaMA-Factory
    "lora_rank": "lora_r",
    "lora_target": "lora_targets",
    "cutoff_len": "max_length",
    "pref_beta": "beta",
    # axolotl
    "base_model": "model",
    "micro_batch_size": "batch_size",
    "sequence_len": "max_length",
    "optimizer": "optim",
    "lora_target_linear": "lora_targets",
    "orpo_alpha": "beta",
}

OPTIM_VALUES = {
    "adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw", "adamw": "adamw",
    "adamw_8bit": "adamw8bit", "adamw_bnb_8bit": "adamw8bit", "adamw8bit": "adamw8bit",
    "paged_adamw_8bit": "paged_adamw8bit", "paged_adamw8bit": "paged_adamw8bit",
}
SCHEDULER_VALUES = {"constant_with_warmup": "constant"}  # our constant schedule warms up too


def _optim(value: Any) -> Any:
    return OPTIM_VALUES.get(str(value).lower(), value)


def _targets(value: Any) -> Any:
    if value is True:  # axolotl's lora_target_linear: true
        return "all-linear"
    if isinstance(value, str) and value.strip().lower() in ("all", "all_linear"):  # LLaMA-Factory's "all"
        return "all-linear"
    return value


def _dtype(name: str) -> Callable[[Any], Any]:
    def convert(value: Any) -> Any:
        return name if value is True or str(value).lower() == "true" else None  # false: no opinion, keep ours

    return convert


def _report_to(value: Any) -> Any:
    if isinstance(value, list | tuple):
        value = ",".join(str(v) for v in value) or "none"
    return "tensorboard,wandb" if str(value).lower() == "all" else value


def _max_steps(value: Any) -> Any:
    return 0 if value == -1 else value  # TRL's -1 "no step limit" is our 0 "run the epochs"


# Value translations, by the key as written (alias or our name); None drops the key.
VALUE_ALIASES: dict[str, Callable[[Any], Any]] = {
    "optim": _optim, "optimizer": _optim,
    "lr_scheduler_type": lambda v: SCHEDULER_VALUES.get(str(v), v),
    "lr_scheduler": lambda v: SCHEDULER_VALUES.get(str(v), v),
    "target_modules": _targets, "lora_target": _targets, "lora_target_linear": _targets, "lora_targets": _targets,
    "bf16": _dtype("bfloat16"), "fp16": _dtype("float16"),
    "report_to": _report_to,
    "max_steps": _max_steps,
}

_warned: set[str] = set()


def normalise_keys(values: dict[str, Any], known: set[str], source: str) -> dict[str, Any]:
    """Our field names for ``values``' keys (kebab or snake case, aliases), values translated.

    Raises :class:`ConfigError` naming ``source`` and the key for an unknown key or a field given twice.
    """
    from ..core.console import console

    out: dict[str, Any] = {}
    given_as: dict[str, str] = {}
    for raw_key, value in values.items():
        key = str(raw_key).replace("-", "_")
        field = key if key in known else KEY_ALIASES.get(key)
        if field is None:
            raise ConfigError(f"{source}: unknown config key {raw_key!r}{_suggest(key, known)}")
        if key in VALUE_ALIASES:
            value = VALUE_ALIASES[key](value)
            if value is None:
                continue
        if field in out:
            raise ConfigError(f"{source}: {given_as[field]!r} and {raw_key!r} both set {field}; keep one")
        if key != field and key not in _warned:
            _warned.add(key)
            console(f"config: {source}: reading {key!r} as {field!r}", prefix="warning")
        out[field] = value
        given_as[field] = str(raw_key)
    return out


def _suggest(key: str, known: set[str]) -> str:
    import difflib

    close = difflib.get_close_matches(key, sorted(known | set(KEY_ALIASES)), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def markdown_table() -> str:
    """The README's alias table, generated from :data:`KEY_ALIASES` so the two cannot drift."""
    rows = ["| key in your config | our field |", "|---|---|"]
    rows += [f"| `{alias}` | `{field}` |" for alias, field in KEY_ALIASES.items()]
    return "\n".join(rows)
