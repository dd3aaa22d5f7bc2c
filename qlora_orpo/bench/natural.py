"""Training on natural preference pairs, ours against TRL's own ``ORPOTrainer``: seconds per optimizer step.

The other benchmark (``worker.py``) measures one step on a pair made to fill ``max_length``.
Real data has a new shape every micro-batch and most pairs far shorter than ``max_length``;
this one trains the same fixed set of HH pairs at their natural lengths with each tool's own
trainer: TRL's ``ORPOTrainer`` with its defaults (its own model loading through
transformers + bitsandbytes, its peft wrapping, its collator and loop), and our
``recipes.finetune.run`` in each ``--step`` mode. Same base, same 4-bit quantisation and
compute dtype, LoRA r=16 / alpha 32 on every linear layer, the same effective batch.

Each configuration runs in a fresh process (``python -m qlora_orpo.bench.natural '<json>'``;
ours under the CPU allocator ``qlora-orpo train`` preloads by default, TRL's as its users run
it) and prints one JSON line: the seconds of each optimizer step (from the step's end to the
next one's; the first step, with its one-off kernel set-up, is reported apart), tokens per
second and the process's peak RSS.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..config import EMBEDDED, OrpoConfig

# (step mode, pairs per micro-batch): the recipe's shape is batch 1 x grad_accum 8. A "-nogc"
# suffix turns gradient checkpointing off, as TRL's defaults (and the recipes) have it.
NATURAL_METHODS: dict[str, tuple[str, int]] = {
    "sequential": ("sequential", 1), "split": ("split", 1), "joint": ("joint", 1), "auto": ("auto", 1),
    "shared": ("shared", 1), "shared-packed": ("shared", 8),
}
NATURAL_METHODS.update({f"{name}-nogc": shape for name, shape in list(NATURAL_METHODS.items())})
DEFAULTS = "defaults"  # ours as `qlora-orpo train` runs with no flags: --step auto, checkpointing auto
NATURAL_METHODS[DEFAULTS] = ("auto", 1)
NO_CHECKPOINTING = "-nogc"
PEER = "trl"  # TRL's ORPOTrainer with its defaults (gradient checkpointing and bf16 on)
PEERS = (PEER, PEER + NO_CHECKPOINTING)  # and with gradient_checkpointing=False, its one change


@dataclass(frozen=True)
class NaturalSpec:
    method: str  # PEER or a key of NATURAL_METHODS
    device: str  # both tools train here: cpu, cuda or cuda:N (no default: a GPU run must say so)
    max_length: int = 512
    steps: int = 4
    pairs_per_step: int = 8
    pack_tokens: int = 0  # shared-packed: tokens per packed row (0: the micro-batch in one row)
    model: str = EMBEDDED
    data: str = EMBEDDED
    seed: int = 42
    beta: float = 0.1


def write_pairs(spec: NaturalSpec, path: Path) -> int:
    """The benchmark's pairs as JSONL (conversational prompt, plain replies): the first of the training split."""
    from ..data.preferences import load_preferences, split_holdout

    train, _ = split_holdout(load_preferences(spec.data).pairs, 0.1)
    chosen = train[: spec.steps * spec.pairs_per_step]
    with open(path, "w", encoding="utf-8") as handle:
        for pair in chosen:
            handle.write(json.dumps({"prompt": list(pair.prompt), "chosen": pair.chosen, "rejected": pair.rejected}) + "\n")
    return len(chosen)


def _peak_memory(device: str) -> dict[str, float]:
    """The process's peak RSS; on a GPU also the peak of the tensors allocated there."""
    peak = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.startswith("cuda"):
        from ..models.memory import peak_memory

        peak["peak_gpu_allocated_mib"] = peak_memory(device)["peak_allocated_mib"]
    return peak


def count_tokens(spec: NaturalSpec, data_file: Path) -> int:
    """Tokens of the pairs as two sequences each (prompt counted twice), by our tokenisation: one count for every row."""
    from ..data.preferences import load_preferences
    from ..data.templating import tokenize_pairs
    from ..models.loader import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path(spec.model))
    cfg = OrpoConfig(max_length=spec.max_length)  # its max_prompt_length resolved as the runs resolve it
    pairs, _ = tokenize_pairs(load_preferences(str(data_file)).pairs, tokenizer, cfg.max_length,
                              cfg.max_prompt_length, progress=False)
    return sum(p.num_tokens for p in pairs)


def _summary(step_ends: list[float], start: float, tokens: int, device: str) -> dict[str, Any]:
    """Seconds per step over the whole run: every tool trains the same pairs once, each in its own
    order, so only the whole pass compares (a single step holds different pairs in each tool)."""
    seconds = [b - a for a, b in zip([start, *step_ends[:-1]], step_ends, strict=True)]
    steady = seconds[1:] or seconds
    return {"first_step_s": seconds[0], "seconds_per_step": statistics.mean(seconds),
            "after_first_step_s": statistics.mean(steady), "step_seconds": seconds,
            "tokens_per_s": tokens / sum(seconds), **_peak_memory(device)}


def ours_config(spec: NaturalSpec, data_file: Path, out_dir: Path) -> OrpoConfig:
    """Our trainer's config for ``spec``: its step mode, micro-batch shape and checkpointing."""
    mode, batch = NATURAL_METHODS[spec.method]
    batch = min(batch, spec.pairs_per_step)  # "packed": the whole optimizer step in one micro-batch
    return OrpoConfig(
        model=spec.model, data=str(data_file), max_length=spec.max_length, max_steps=spec.steps,
        batch_size=batch, grad_accum=spec.pairs_per_step // batch, step=mode, pack_tokens=spec.pack_tokens,
        beta=spec.beta, seed=spec.seed, eval_fraction=0.0, health_prompts=0, eval_every=0, save_every=0,
        gradient_checkpointing=("auto" if spec.method == DEFAULTS
                                else "off" if spec.method.endswith(NO_CHECKPOINTING) else "on"),
        log_every=1, output_dir=str(out_dir), run_name="ours", device=spec.device,
    )


def run_ours(spec: NaturalSpec, data_file: Path, out_dir: Path) -> tuple[list[float], float]:
    from ..recipes.finetune import run
    from ..training.metrics import read_metrics

    run(ours_config(spec, data_file, out_dir))
    records = [r for r in read_metrics(out_dir / "ours" / "metrics.jsonl") if r.get("split") == "train"]
    seconds = [r["seconds_per_step"] for r in records]
    return [sum(seconds[: i + 1]) for i in range(len(seconds))], 0.0


def run_trl(spec: NaturalSpec, data_file: Path, out_dir: Path) -> tuple[list[float], float]:
    """TRL's ``ORPOTrainer`` as its documentation sets it up, with its defaults."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    from ..models.loader import resolve_compute_dtype, resolve_model_path

    path = resolve_model_path(spec.model)
    device = torch.device(spec.device)
    compute_dtype = resolve_compute_dtype("auto", device)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute_dtype)
    # On a GPU, as TRL's docs load a 4-bit model: onto the device (the Trainer does not move it).
    placement = {"device_map": {"": device.index or 0}} if device.type == "cuda" else {}
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, **placement)
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = load_dataset("json", data_files=str(data_file), split="train")
    # Conversational preference rows, as TRL documents them: the replies as assistant turns.
    dataset = rows.map(lambda r: {"chosen": [{"role": "assistant", "content": r["chosen"]}],
                                  "rejected": [{"role": "assistant", "content": r["rejected"]}]})
    args = ORPOConfig(
        output_dir=str(out_dir / "trl"), per_device_train_batch_size=1,
        gradient_accumulation_steps=spec.pairs_per_step, max_steps=spec.steps, max_length=spec.max_length,
        beta=spec.beta, seed=spec.seed, report_to="none", save_strategy="no", logging_steps=1,
        use_cpu=device.type == "cpu",
        **({"gradient_checkpointing": False} if spec.method.endswith(NO_CHECKPOINTING) else {}),
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    ends: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            ends.append(time.perf_counter())

    trainer = ORPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                          peft_config=lora, callbacks=[StepTimes()])
    start = time.perf_counter()
    trainer.train()
    return ends, start


def worker_main(spec_json: str) -> int:
    spec = NaturalSpec(**json.loads(spec_json))
    with tempfile.TemporaryDirectory(prefix="qlora-orpo-natural-") as tmp:
        data_file = Path(tmp) / "pairs.jsonl"
        pairs = write_pairs(spec, data_file)
        runner = run_trl if spec.method in PEERS else run_ours
        ends, start = runner(spec, data_file, Path(tmp))
        result = {**asdict(spec), "pairs": pairs,
                  **_summary(ends, start, count_tokens(spec, data_file), spec.device)}
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def run_in_subprocess(spec: NaturalSpec, timeout: float | None = None) -> dict[str, Any]:
    """One configuration in a fresh interpreter; an ``error`` row when it fails."""
    command = [sys.executable, "-m", "qlora_orpo.bench.natural", json.dumps(asdict(spec))]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {**asdict(spec), "error": f"timed out after {timeout} s"}
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {**asdict(spec), "error": f"worker exited with {done.returncode}: {done.stderr.strip()[-2000:]}"}


def markdown(results: list[dict[str, Any]]) -> str:
    gpu = any("peak_gpu_allocated_mib" in r for r in results)  # a GPU run: its peak is the one that counts
    memory = "peak GPU MiB (allocated)" if gpu else "peak RSS MiB"
    lines = [f"| max_length | method | s / optimizer step | first step s | tokens / s | {memory} | vs TRL's defaults "
             "| vs TRL, same checkpointing |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    seconds = {(r["max_length"], r["method"]): r["seconds_per_step"] for r in results if "error" not in r}

    def ratio(r: dict[str, Any], peer: str | None) -> str:
        base = seconds.get((r["max_length"], peer)) if peer else None
        return f"{r['seconds_per_step'] / base:.2f}x" if base else ""

    for r in results:
        if "error" in r:
            lines.append(f"| {r['max_length']} | {r['method']} | error: {r['error'][:120]} | | | | | |")
            continue
        # "defaults" lets auto choose its checkpointing: no TRL row has the same setting.
        same = PEERS[1] if r["method"].endswith(NO_CHECKPOINTING) else None if r["method"] == DEFAULTS else PEER
        lines.append(f"| {r['max_length']} | {r['method']} | {r['seconds_per_step']:.2f} | {r['first_step_s']:.2f} | "
                     f"{r['tokens_per_s']:.0f} | {r['peak_gpu_allocated_mib' if gpu else 'peak_rss_mib']:.0f} | "
                     f"{ratio(r, PEER)} | {ratio(r, same)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if json.loads(sys.argv[1])["method"] not in PEERS:
        # As `qlora-orpo train` runs: under the allocator its default policy preloads (mimalloc
        # from the cmeel-mimalloc wheel here). TRL's trainer runs as its users run it.
        from ..models.memory import reexec_with_allocator

        reexec_with_allocator(OrpoConfig.cpu_allocator, ["-m", "qlora_orpo.bench.natural", *sys.argv[1:]])
    sys.exit(worker_main(sys.argv[1]))
