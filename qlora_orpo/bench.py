"""One ORPO optimizer step, measured: TRL's loss path against ours (``joint`` and ``split``).

Behind ``scripts/bench_orpo.py``. Every configuration runs in a fresh process (a *worker*:
the script again with ``--worker SPEC``) so that no allocator cache, peak or thread pool
carries over. A worker:

1. applies the CPU allocator policy (jemalloc comes from ``LD_PRELOAD``, set by the parent);
2. loads the base and a fresh LoRA adapter with ``model.load_model_for_training`` (4-bit NF4,
   r=16, alpha 32, every linear layer, dropout 0 so that every configuration computes the
   same function), builds :func:`fixed_pair` at ``max_length`` and an AdamW optimizer, and
   for TRL constructs its ``ORPOTrainer`` around that same model;
3. runs ``gc.collect()``, ``malloc_trim()`` and ``reset_peak_memory()`` and reads the
   baseline (CUDA: allocated bytes; CPU: the resident set);
4. runs the step(s): forward, backward and ``optimizer.step()``;
5. prints one JSON line: peak memory above the baseline, seconds per pair, tokens per
   second, the loss of the first step, and the analytic floor of ``floor.py``.

The TRL row calls ``ORPOTrainer.get_batch_loss_metrics`` (its ``concatenated_forward``,
``odds_ratio_loss`` and NLL) on our batch, converted to the keys its collator produces; the
training loop, data pipeline and optimizer of ``transformers.Trainer`` are not used, so the
rows differ only in the loss path. Ours runs with ``nll_over_prompt=True`` to compute the
same loss as TRL (NLL over prompt + response).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .collate import PairBatch, TokenizedPair, collate_pairs
from .config import EMBEDDED, OrpoConfig
from .floor import ModelShape, memory_floor
from .memory import (
    MIB,
    apply_cpu_allocator_policy,
    find_jemalloc,
    malloc_trim,
    peak_memory,
    reset_peak_memory,
)
from .templating import tokenize_pair

METHODS = ("trl", "joint", "sequential", "split")
DEFAULT_METHODS = ("trl", "joint", "split")
LENGTHS = (256, 512, 1024, 2048)
QUICK_LENGTHS = (32, 64)
ALLOCATORS = ("glibc", "trim", "jemalloc")
PEER = "trl"
TRL_MISSING = "trl is not installed (install the bench extra: pip install -e '.[bench]'); TRL row skipped"


@dataclass(frozen=True)
class BenchSpec:
    """One configuration, as passed to a worker (JSON on its command line)."""

    method: str  # "trl", "joint", "sequential" or "split"
    max_length: int
    model: str = EMBEDDED
    quant: str = "nf4"
    compute_dtype: str = "auto"
    device: str = "auto"
    allocator: str = "trim"  # "glibc", "trim" or "jemalloc"
    chunk_size: int = OrpoConfig.logits_chunk_size  # the training default
    beta: float = 0.1
    steps: int = 1
    seed: int = 42
    data: str = EMBEDDED

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.allocator not in ALLOCATORS:
            raise ValueError(f"allocator {self.allocator!r} is not one of {', '.join(ALLOCATORS)}")
        if self.max_length < 8:
            raise ValueError(f"max_length must be at least 8, got {self.max_length}")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")

    def config(self) -> OrpoConfig:
        """The training config this configuration loads its model with."""
        return OrpoConfig(
            model=self.model, data=self.data, quant=self.quant, compute_dtype=self.compute_dtype,
            device=self.device, lora_r=16, lora_alpha=32, lora_dropout=0.0, lora_targets="all-linear",
            gradient_checkpointing=True, max_length=self.max_length, max_prompt_length=prompt_length(self.max_length),
            logits_chunk_size=self.chunk_size, beta=self.beta, seed=self.seed, nll_over_prompt=True,
            step=self.method if self.method != PEER else "joint",
            cpu_allocator="glibc" if self.allocator == "jemalloc" else self.allocator,
        )


# ---------------------------------------------------------------------------------------------
# The batch
# ---------------------------------------------------------------------------------------------


def prompt_length(max_length: int) -> int:
    """Prompt tokens of the benchmark pair: a quarter of the sequence."""
    return max(1, max_length // 4)


def _cycle(ids: Sequence[int], length: int) -> tuple[int, ...]:
    """``ids`` repeated until ``length`` tokens, then cut."""
    return tuple(ids[i % len(ids)] for i in range(length))


def fixed_pair(tokenizer, max_length: int, data: str = EMBEDDED) -> TokenizedPair:
    """One pair whose prompt + chosen and prompt + rejected are both exactly ``max_length`` tokens.

    Made from the first pair of ``data`` (the embedded Anthropic HH file by default) that
    tokenises: its chat-templated prompt repeated and cut from the front to
    ``max_length // 4`` tokens (so it still ends where the assistant starts), and each
    response (with its EOS) repeated and cut to the remaining tokens. Every configuration
    gets the same ids, so their losses are comparable.
    """
    from .data import load_preferences

    unlimited = 10**9
    for pair in load_preferences(data).pairs:
        tokenized, _ = tokenize_pair(pair, tokenizer, max_length=unlimited, max_prompt_length=unlimited - 1)
        if tokenized is not None and tokenized.prompt_ids:
            break
    else:  # pragma: no cover - load_preferences raises when no row is usable
        raise ValueError(f"{data}: no pair survives tokenisation")
    n_prompt = prompt_length(max_length)
    n_response = max_length - n_prompt
    prompt = _cycle(tokenized.prompt_ids[::-1], n_prompt)[::-1]
    return TokenizedPair(
        prompt_ids=prompt,
        chosen_ids=_cycle(tokenized.chosen_ids, n_response),
        rejected_ids=_cycle(tokenized.rejected_ids, n_response),
        row=tokenized.row,
        truncated=True,
    )


# ---------------------------------------------------------------------------------------------
# The peer: TRL's ORPO loss path
# ---------------------------------------------------------------------------------------------


def trl_inputs(batch: PairBatch) -> dict[str, torch.Tensor]:
    """Our batch under the keys TRL's ORPO collator produces (``DPODataCollatorWithPadding``).

    TRL's ``*_labels`` are the input ids with the prompt and padding set to -100, which is
    our ``labels``; its NLL covers every attended token, which it derives from the mask.
    """
    inputs = {}
    for name, side in (("chosen", batch.chosen), ("rejected", batch.rejected)):
        inputs[f"{name}_input_ids"] = side.input_ids
        inputs[f"{name}_attention_mask"] = side.attention_mask
        inputs[f"{name}_labels"] = side.labels
    return inputs


def trl_trainer(model: torch.nn.Module, tokenizer, beta: float, max_length: int, output_dir: str | Path):
    """TRL's ``ORPOTrainer`` around ``model`` as it is (no peft config, no re-preparation).

    The constructor requires a training set; one placeholder row is given and never used.
    ``gradient_checkpointing=False`` only stops the constructor from touching the model's
    checkpointing, which ``model.load_model_for_training`` has already set up.
    Raises ImportError when trl is not installed.
    """
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    device = next(model.parameters()).device
    args = ORPOConfig(
        output_dir=str(output_dir), beta=beta, max_length=max_length, report_to="none",
        gradient_checkpointing=False, bf16=False, remove_unused_columns=False, disable_dropout=True,
        use_cpu=device.type == "cpu",
    )
    placeholder = Dataset.from_list([{"prompt": "Hello", "chosen": " world", "rejected": " there"}])
    return ORPOTrainer(model=model, args=args, train_dataset=placeholder, processing_class=tokenizer)


def trl_loss(trainer, model: torch.nn.Module, batch: PairBatch) -> tuple[torch.Tensor, dict[str, float]]:
    """TRL's ORPO loss of ``batch`` (with grad) and its metrics renamed to ours.

    TRL's metric ``log_odds_ratio`` is the mean of log sigmoid(ratio), i.e. minus our
    ``or_loss``; its ``log_odds_chosen`` is the mean log-odds ratio, our ``log_odds_ratio``.
    """
    loss, metrics = trainer.get_batch_loss_metrics(model, trl_inputs(batch), train_eval="train")
    return loss, {
        "nll": metrics["nll_loss"],
        "or_loss": -metrics["log_odds_ratio"],
        "log_odds_ratio": metrics["log_odds_chosen"],
        "reward_margin": metrics["rewards/margins"],
    }


# ---------------------------------------------------------------------------------------------
# The worker
# ---------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _memory_now_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / MIB
    memory = peak_memory(device)
    return memory.get("rss_mib", memory["peak_rss_mib"])


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MIB
    return peak_memory(device)["peak_rss_mib"]


def run_worker(spec: BenchSpec) -> dict[str, Any]:
    """Load, measure one configuration in this process, and return its result row."""
    row: dict[str, Any] = {"method": spec.method, "max_length": spec.max_length, "allocator": spec.allocator}
    if spec.method == PEER:
        try:
            import trl  # noqa: F401  (checked before the model is loaded)
        except ImportError:
            return {**row, "skipped": TRL_MISSING}
    from .model import load_model_for_training
    from .step import OrpoStep

    cfg = spec.config()
    row["allocator_detail"] = apply_cpu_allocator_policy(cfg.cpu_allocator)
    if spec.allocator == "jemalloc" and "jemalloc" not in row["allocator_detail"]:
        return {**row, "error": f"LD_PRELOAD did not bring jemalloc into the worker ({row['allocator_detail']})"}
    model, tokenizer, info = load_model_for_training(cfg)
    device = info.device
    pair = fixed_pair(tokenizer, spec.max_length, spec.data)
    batch = collate_pairs([pair], tokenizer.pad_token_id).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()  # gradient checkpointing is only active in training mode

    with tempfile.TemporaryDirectory() as scratch:
        if spec.method == PEER:
            trainer = trl_trainer(model, tokenizer, spec.beta, spec.max_length, scratch)

            def forward_backward() -> tuple[torch.Tensor, dict[str, Any]]:
                loss, metrics = trl_loss(trainer, model, batch)
                loss.backward()
                return loss.detach(), metrics
        else:
            step = OrpoStep(model, spec.beta, spec.method, spec.chunk_size, True, tokenizer.pad_token_id, device)

            def forward_backward() -> tuple[torch.Tensor, dict[str, Any]]:
                out = step(batch)
                return out.loss, out.metrics

        gc.collect()
        malloc_trim()
        _sync(device)
        reset_ok = reset_peak_memory(device)
        baseline = _memory_now_mib(device)
        seconds, losses, first_metrics = [], [], None
        for _ in range(spec.steps):
            _sync(device)
            start = time.perf_counter()
            loss, metrics = forward_backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _sync(device)
            seconds.append(time.perf_counter() - start)
            losses.append(float(loss))
            first_metrics = first_metrics or {k: float(v) for k, v in metrics.items()}
        peak = _peak_mib(device)

    shape = ModelShape.from_config(model.get_base_model().config)
    activation_bytes = model.get_input_embeddings().weight.element_size()
    floor = memory_floor(shape, spec.max_length, 16, "all-linear", spec.chunk_size, activation_bytes)
    two_sides = memory_floor(shape, spec.max_length, 16, "all-linear", spec.chunk_size, activation_bytes, sequences=2)
    timed = seconds[1:] or seconds  # with several steps, the first (warm-up) is left out
    per_step = sum(timed) / len(timed)
    tokens = batch.chosen.num_tokens + batch.rejected.num_tokens
    row.update(
        device=str(device), threads=torch.get_num_threads(), quant=info.quant,
        compute_dtype=str(info.compute_dtype).removeprefix("torch."), pairs=batch.size, tokens=tokens,
        baseline_mib=baseline, peak_mib=peak, peak_above_baseline_mib=peak - baseline,
        peak_reset=reset_ok, seconds_per_step=seconds, seconds_per_pair=per_step / batch.size,
        tokens_per_s=tokens / per_step, loss=losses[0], losses=losses,
        nll=first_metrics["nll"], or_loss=first_metrics["or_loss"],
        floor_step_mib=floor.step_bytes / MIB, floor_resident_mib=floor.resident_bytes / MIB,
        floor_two_sequences_mib=two_sides.step_bytes / MIB, floor_steady_step_mib=floor.steady_step_bytes / MIB,
        floor_ratio=(peak - baseline) / (floor.step_bytes / MIB),
        trainable_params=info.trainable_params, data_row=pair.row,
    )
    return row


def worker_main(spec_json: str) -> int:
    """``--worker``: run one configuration; everything but the result line goes to stderr."""
    spec = BenchSpec(**json.loads(spec_json))
    stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        row = run_worker(spec)
    stdout.write(json.dumps(row) + "\n")
    stdout.flush()
    return 0


# ---------------------------------------------------------------------------------------------
# The parent
# ---------------------------------------------------------------------------------------------


def _parse_result(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict) and "method" in value:
                return value
    return None


def run_in_subprocess(script: Path, spec: BenchSpec, timeout: float | None = None) -> dict[str, Any]:
    """Run ``script --worker SPEC`` in a fresh process and return its row (or an ``error`` row)."""
    row: dict[str, Any] = {"method": spec.method, "max_length": spec.max_length, "allocator": spec.allocator}
    env = dict(os.environ)
    if spec.allocator == "jemalloc":
        library = find_jemalloc()
        if library is None:
            return {**row, "skipped": "libjemalloc.so.2 not found (install libjemalloc2 or set JEMALLOC_PATH)"}
        env["LD_PRELOAD"] = " ".join(filter(None, [library, env.get("LD_PRELOAD", "")]))
    command = [sys.executable, str(script), "--worker", json.dumps(asdict(spec))]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {**row, "error": f"timed out after {timeout:.0f} s"}
    result = _parse_result(done.stdout)
    if done.returncode != 0 or result is None:
        tail = "\n".join(done.stderr.strip().splitlines()[-8:])
        return {**row, "error": f"worker exited with {done.returncode}: {tail}"}
    return result


def plan(
    lengths: Iterable[int], methods: Iterable[str], allocators: Iterable[str], base: BenchSpec
) -> list[BenchSpec]:
    """Every (allocator, length, method) configuration, in the order they run."""
    return [
        replace(base, method=method, max_length=length, allocator=allocator)
        for allocator in allocators
        for length in lengths
        for method in methods
    ]


def peer_missing_reason() -> str | None:
    """None when trl can be imported, else why its rows are skipped."""
    try:
        import trl  # noqa: F401
    except ImportError:
        return TRL_MISSING
    return None


def run_benchmark(
    script: Path, specs: Sequence[BenchSpec], on_row: Callable[[dict[str, Any]], None] | None = None
) -> list[dict[str, Any]]:
    """Run every spec in its own process; the peer's rows are skipped, with the reason, when trl is missing."""
    rows: list[dict[str, Any]] = []
    peer_missing = peer_missing_reason() if any(s.method == PEER for s in specs) else None
    for spec in specs:
        if spec.method == PEER and peer_missing:
            row = {"method": spec.method, "max_length": spec.max_length, "allocator": spec.allocator,
                   "skipped": peer_missing}
        else:
            row = run_in_subprocess(script, spec)
            if spec.method == PEER and "skipped" in row:
                peer_missing = row["skipped"]
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def build_tiny_model_dir(path: Path, data: str = EMBEDDED, vocab_size: int = 512, hidden: int = 64) -> Path:
    """A 2-layer random Llama and a byte-level BPE tokenizer trained on a few rows of ``data``.

    For ``--quick`` runs: built in about a second, nothing downloaded.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from .data import load_preferences

    pairs = load_preferences(data).pairs[:200]
    corpus = [m["content"] for p in pairs for m in p.prompt] + [p.chosen for p in pairs] + [p.rejected for p in pairs]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(
        corpus,
        trainer=trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=specials, show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
        "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------


def _mib(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per configuration; skipped and failed ones say why."""
    lines = [
        "| method | max_length | allocator | memory above baseline (MiB) | floor (MiB) | measured / floor "
        "| s / pair | tokens / s | loss |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        head = f"| {row['method']} | {row['max_length']} | {row['allocator']} "
        if "skipped" in row or "error" in row:
            why = row.get("skipped") or row["error"].splitlines()[-1]
            lines.append(head + f"| {'skipped' if 'skipped' in row else 'failed'}: {why} | | | | | |")
            continue
        lines.append(
            head + f"| {_mib(row['peak_above_baseline_mib'])} | {_mib(row['floor_step_mib'])} "
            f"| {row['floor_ratio']:.1f}x | {row['seconds_per_pair']:.2f} | {row['tokens_per_s']:,.0f} "
            f"| {row['loss']:.6f} |"
        )
    return "\n".join(lines)


def plot_memory(rows: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """PNG of memory above the post-load baseline against max_length, one line per configuration."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    measured = [r for r in rows if "peak_above_baseline_mib" in r]
    if not measured:
        return None
    fig = Figure(figsize=(8, 4.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    allocators = sorted({r["allocator"] for r in measured})
    for method in METHODS:
        for allocator in allocators:
            points = sorted(
                (r["max_length"], r["peak_above_baseline_mib"], r["floor_ratio"])
                for r in measured if r["method"] == method and r["allocator"] == allocator
            )
            if not points:
                continue
            label = method if len(allocators) == 1 else f"{method} ({allocator})"
            xs, ys, ratios = zip(*points, strict=True)
            (line,) = ax.plot(xs, ys, marker="o", label=label)
            for x, y, ratio in points:
                ax.annotate(f"{ratio:.1f}x", (x, y), textcoords="offset points", xytext=(6, 4), fontsize=7,
                            color=line.get_color())
    floor = sorted({(r["max_length"], r["floor_step_mib"]) for r in measured})
    ax.plot(*zip(*floor, strict=True), linestyle="--", marker="x", color="grey",
            label="analytic floor (floor.py); labels: measured / floor")
    ax.set_xscale("log", base=2)
    ax.set_xticks([x for x, _ in floor], labels=[str(x) for x, _ in floor])
    ax.set_xlabel("max_length (tokens per side; one pair)")
    ax.set_ylabel("peak memory above post-load baseline (MiB)")
    ax.set_ylim(bottom=0)
    first = measured[0]
    default_title = f"One ORPO optimizer step ({first.get('quant', '')} base, {first.get('device', '')})"
    ax.set_title(title or default_title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def write_report(rows: Sequence[dict[str, Any]], out_dir: Path, settings: dict[str, Any]) -> dict[str, Path]:
    """``results.json``, ``results.md`` and ``memory_vs_length.png`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md"}
    paths["json"].write_text(json.dumps({"settings": settings, "rows": list(rows)}, indent=2) + "\n")
    paths["markdown"].write_text(markdown_table(rows) + "\n")
    model = settings.get("model", "")
    first = next((r for r in rows if "device" in r), {})
    title = f"One ORPO optimizer step: {model}, {first.get('quant', '')} base, {first.get('device', '')}"
    png = plot_memory(rows, out_dir / "memory_vs_length.png", title=title)
    if png is not None:
        paths["png"] = png
    return paths


def describe_machine() -> dict[str, Any]:
    """CPU model, cores and GPU, for the report."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": model, "cores": os.cpu_count(), "gpu": gpu, "torch": torch.__version__,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _csv(kind: Callable[[str], Any], choices: Sequence[Any] | None = None) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        values = [kind(v.strip()) for v in text.split(",") if v.strip()]
        bad = [v for v in values if choices is not None and v not in choices]
        if not values or bad:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list{' of ' + ', '.join(map(str, choices)) if choices else ''}, got {text!r}"
            )
        return values

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench_orpo.py",
        description="Peak memory, time and loss of one ORPO optimizer step: TRL's loss path vs ours "
        "(--step joint, --step split), each configuration in a fresh process.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--lengths", type=_csv(int), help=f"max_length values (default {LENGTHS}; --quick {QUICK_LENGTHS})")
    parser.add_argument("--methods", type=_csv(str, METHODS), default=list(DEFAULT_METHODS),
                        help=f"configurations to run, from {', '.join(METHODS)}")
    parser.add_argument("--allocator", choices=ALLOCATORS, default="trim",
                        help="CPU allocator of every worker: glibc as is, glibc with trimming (what training "
                        "uses here), or jemalloc through LD_PRELOAD (skipped when not found)")
    parser.add_argument("--allocators", type=_csv(str, ALLOCATORS),
                        help="compare CPU allocators instead: run --step split at each length under each one")
    parser.add_argument("--quick", action="store_true",
                        help="CI-sized run: a tiny random model built in a temporary directory, lengths 32 and 64")
    parser.add_argument("--model", default=EMBEDDED, help="base model ('embedded' or a local directory)")
    parser.add_argument("--quant", choices=("nf4", "fp4", "none"), default="nf4", help="base quantisation")
    parser.add_argument("--compute-dtype", choices=("auto", "bfloat16", "float16", "float32"),
                        help="compute dtype of the 4-bit layers (default auto; --quick: float32, so that the "
                        "tiny model's losses can be compared exactly)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--chunk-size", type=int, default=OrpoConfig.logits_chunk_size, help="logits chunk of our step")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=1,
                        help="optimizer steps per configuration; with more than one the first is left out of the timing")
    parser.add_argument("--timeout", type=float, default=None, help="seconds allowed per configuration")
    parser.add_argument("--out", type=Path, help="directory for results.json, results.md and memory_vs_length.png "
                        "(default bench_results/orpo-<time>)")
    parser.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None, script: Path) -> int:
    """Entry point of ``scripts/bench_orpo.py``; ``script`` is what the workers run."""
    args = build_parser().parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    lengths = args.lengths or list(QUICK_LENGTHS if args.quick else LENGTHS)
    methods = ["split"] if args.allocators else args.methods
    allocators = args.allocators or [args.allocator]
    out_dir = args.out or Path("bench_results") / time.strftime("orpo-%Y%m%d-%H%M%S")
    with tempfile.TemporaryDirectory(prefix="bench-orpo-") as scratch:
        model = args.model
        if args.quick:
            model = str(build_tiny_model_dir(Path(scratch) / "tiny-llama"))
            print(f"[bench] --quick: tiny random Llama built in {model}", file=sys.stderr)
        base = BenchSpec(
            method="split", max_length=lengths[0], model=model, quant=args.quant,
            compute_dtype=args.compute_dtype or ("float32" if args.quick else "auto"), device=args.device, allocator=allocators[0],
            chunk_size=args.chunk_size, beta=args.beta, steps=args.steps,
        )
        specs = plan(lengths, methods, allocators, base)

        def report(row: dict[str, Any]) -> None:
            print(json.dumps(row), flush=True)
            if "skipped" in row:
                print(f"[bench] {row['method']} at {row['max_length']} ({row['allocator']}): skipped: {row['skipped']}",
                      file=sys.stderr)
            elif "error" in row:
                print(f"[bench] {row['method']} at {row['max_length']} ({row['allocator']}): FAILED: {row['error']}",
                      file=sys.stderr)
            else:
                print(f"[bench] {row['method']} at {row['max_length']} ({row['allocator']}): "
                      f"{row['peak_above_baseline_mib']:,.0f} MiB above baseline, "
                      f"{row['seconds_per_pair']:.2f} s/pair, loss {row['loss']:.6f}", file=sys.stderr)

        rows = run_benchmark(script, specs, on_row=report)
    model_name = "SmolLM2-135M-Instruct (embedded)" if args.model == EMBEDDED else args.model
    settings = {**asdict(base), "model": model_name if not args.quick else "tiny random Llama (--quick)",
                "lengths": lengths, "methods": methods, "allocators": allocators, "quick": args.quick,
                "machine": describe_machine(), "command": " ".join([Path(script).name, *(argv or [])])}
    settings.pop("method"), settings.pop("max_length"), settings.pop("allocator")
    paths = write_report(rows, out_dir, settings)
    print(markdown_table(rows))
    print(f"[bench] wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    failed = [r for r in rows if "error" in r]
    return 1 if failed else 0
