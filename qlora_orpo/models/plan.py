"""``qlora-orpo plan``: the predicted peak memory of a training step, from a model's ``config.json``.

The prediction is the analytic floor of ``floor.py`` (what must exist at the peak of a
``--step split`` step, part by part) times an overhead factor measured by the benchmark: what
the floor leaves out (allocator slack, dequantised weight copies inside each 4-bit matmul,
kernel caches, autograd bookkeeping). :data:`MEASURED` holds the benchmark's ``split`` rows
on the embedded SmolLM2-135M (CPU, logits chunk 64) under two allocators; measured/floor
runs from 1.09 to 1.90 (larger at short lengths, where fixed costs weigh more, and larger
under jemalloc than under glibc with trimming). :data:`OVERHEAD` is the one factor whose
largest relative error over those six rows is smallest (27%): it is fitted to them, so the
30% agreement with them is a calibration, not an independent validation.

Two variants are always shown, since they differ by almost a third on large vocabularies:

* ``float32``: the embedding, norms and an untied ``lm_head`` kept in float32, and so the
  residual stream: how ``loader.py`` loads a model on the CPU.
* ``bf16``: those parameters and the residual stream in bfloat16 (2 bytes each): how it
  loads one on a CUDA GPU with bfloat16 compute (``model.residual_dtype``).

A run's peak is the loaded model (``resident``), the AdamW states that stay resident after
the first step, the largest working set of a step (``backward``), all scaled as above, plus
``reserve``: the process itself (CUDA context on a GPU, Python and torch's libraries on a
CPU), which no formula here sees.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..core.errors import UserError
from .checkpointing import choose_checkpointing
from .floor import MemoryFloor, ModelShape, memory_floor

GIB = 2**30
MIB = 2**20
# (allocator, max_length, MiB measured above the loaded model, the floor's first step in MiB):
# --step split, one pair, embedded SmolLM2-135M on this project's 2-core CPU.
MEASURED = (
    ("jemalloc", 512, 156.0, 82.2),  # docs/benchmarks.md, full table
    ("jemalloc", 1024, 219.0, 145.8),
    ("jemalloc", 2048, 357.0, 273.0),
    ("trim", 512, 135.9, 82.2),  # docs/bench_plan_split_trim.json
    ("trim", 1024, 176.4, 145.8),
    ("trim", 2048, 296.9, 273.0),
)
_RATIOS = [measured / floor for _, _, measured, floor in MEASURED]
# The minimax factor: equal relative error at the smallest and the largest measured ratio.
OVERHEAD = 2 / (1 / min(_RATIOS) + 1 / max(_RATIOS))
OVERHEAD_SOURCE = (f"measured/floor {min(_RATIOS):.2f}-{max(_RATIOS):.2f} over the benchmark's split rows at "
                   "512-2048 tokens, SmolLM2-135M, two allocators; docs/benchmarks.md")
STEP_MODE = "split"  # one side's activations alive at a time; the project's default --step
VARIANTS = {"float32": 4, "bf16": 2}  # bytes per residual-stream element and full-precision parameter
LENGTH_QUANTUM = 64  # largest max_length is searched in steps of this many tokens
MAX_SEARCH_LENGTH = 1 << 20
MAX_SEARCH_BATCH = 4096


def read_model_config(model: str) -> tuple[dict[str, Any], str]:
    """``config.json`` of a local directory, a JSON file, ``embedded``, or a hub id; and where it came from."""
    if model == "embedded":
        from .loader import resolve_model_path

        model = resolve_model_path(model)
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise UserError(f"{path.parent}: no config.json in this directory")
    elif not path.is_file():
        if model.count("/") != 1 or model.startswith((".", "/")):
            raise UserError(f"{model}: not a directory, a config.json file or a hub id (owner/name)")
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(model, "config.json"))
        except Exception as exc:  # offline, unknown repo, gated model: one line, naming the id
            raise UserError(f"{model}: cannot fetch config.json from the hub ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})") from None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read the model config ({exc})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a JSON object")
    config = config.get("text_config", config)  # multimodal configs keep the decoder's numbers there
    return config, str(path)


def model_shape(config: dict[str, Any], source: str) -> ModelShape:
    try:
        return ModelShape.from_config(config)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{source}: not a Llama-style decoder config ({exc})") from None


@dataclass(frozen=True)
class Prediction:
    """One variant at one (length, batch): the floor's parts and the predicted figures."""

    variant: str
    floor: MemoryFloor
    overhead: float
    reserve_bytes: int

    @property
    def step_bytes(self) -> int:
        """Predicted first-step memory above the loaded model: what the benchmark measures."""
        return int(self.overhead * self.floor.step_bytes)

    @property
    def peak_bytes(self) -> int:
        """Predicted peak of a run: loaded model + scaled steady step + the process's reserve."""
        return self.floor.resident_bytes + int(self.overhead * self.floor.steady_step_bytes) + self.reserve_bytes


def predict(
    shape: ModelShape,
    max_length: int,
    batch_size: int = 1,
    variant: str = "float32",
    lora_r: int = 16,
    chunk_size: int = 64,
    overhead: float = OVERHEAD,
    reserve_gib: float = 0.0,
) -> Prediction:
    """The ``split`` step's prediction: ``batch_size`` pairs, each side ``max_length`` tokens."""
    width = VARIANTS[variant]
    floor = memory_floor(shape, max_length, lora_r=lora_r, chunk_size=chunk_size, activation_bytes=width,
                         param_bytes=width, sequences=batch_size)
    # split runs one side of the batch at a time and holds the first side's LoRA gradients during
    # the second's backward: the floor's one-sequence schedule, with batch_size sequences' activations.
    floor = replace(floor, sequences=1)
    return Prediction(variant, floor, overhead, int(reserve_gib * GIB))


# --step auto's choices, fastest and hungriest first: its chooser and its out-of-memory retry use this order.
AUTO_MODES = ("shared", "sequential", "split")
# --step auto takes the shared layout only when its rows hold at most this share of the two sides'
# tokens (natural HH pairs: 223 against 346, 0.64; a short prompt with 2048-token replies: ~0.98).
SHARED_MAX_SHARE = 0.8


def shared_saves_tokens(row_tokens: int, rows: int, pairs: int, tokens_per_side: int) -> bool:
    """Whether ``rows`` shared rows of ``row_tokens`` save enough over ``2 * pairs`` sides of ``tokens_per_side``."""
    return rows * row_tokens <= SHARED_MAX_SHARE * 2 * pairs * tokens_per_side


def shared_row_tokens(max_length: int, pack_tokens: int = 0) -> int:
    """The widest row of the shared layout: ``pack_tokens`` (0 = ``max_length``), or one pair alone.

    A pair's row holds prompt + chosen + rejected: with each side at most ``max_length``, that is
    at most ``2 * max_length - 1`` (a one-token prompt), wider than a packed row's budget.
    """
    return max(pack_tokens or max_length, 2 * max_length - 1)


def predict_mode(
    shape: ModelShape, max_length: int, batch_size: int, mode: str, pack_tokens: int = 0, **kwargs: Any
) -> Prediction:
    """The prediction of ``--step mode`` for ``batch_size`` pairs at ``max_length``, each at its worst case.

    ``split`` holds one side's activations; ``sequential`` both sides of every pair (``2 * batch``
    sequences); ``shared`` one row per pair at its widest (:func:`shared_row_tokens`): natural
    data packs several pairs into shorter rows, so the real figure is lower. The overhead factor
    was fitted on ``split`` alone; for the other two it is an assumption, not a calibration.
    """
    if mode == "split":
        return predict(shape, max_length, batch_size, **kwargs)
    width = VARIANTS[kwargs.get("variant", "float32")]
    if mode == "sequential":
        length, sequences = max_length, 2 * batch_size
    elif mode == "shared":
        length, sequences = shared_row_tokens(max_length, pack_tokens), batch_size
    else:
        raise ValueError(f"unknown step mode {mode!r}; one of {', '.join(AUTO_MODES)}")
    floor = memory_floor(shape, length, lora_r=kwargs.get("lora_r", 16), chunk_size=kwargs.get("chunk_size", 64),
                         activation_bytes=width, param_bytes=width, sequences=sequences)
    return Prediction(kwargs.get("variant", "float32"), floor, kwargs.get("overhead", OVERHEAD),
                      int(kwargs.get("reserve_gib", 0.0) * GIB))


def auto_mode(shape: ModelShape, max_length: int, batch_size: int, budget_bytes: int, **kwargs: Any) -> str | None:
    """What ``--step auto`` would pick at the worst case: the first of :data:`AUTO_MODES` that fits.

    As the chooser does, ``shared`` only where it saves tokens: at the worst case (a one-token
    prompt, one row per pair) it never does, so there the answer is ``sequential`` or ``split``.
    """
    pack_tokens = kwargs.get("pack_tokens", 0)
    for mode in AUTO_MODES:
        if mode == "shared" and not shared_saves_tokens(shared_row_tokens(max_length, pack_tokens), batch_size,
                                                        batch_size, max_length):
            continue
        if predict_mode(shape, max_length, batch_size, mode, **kwargs).peak_bytes <= budget_bytes:
            return mode
    return None


def largest_length(shape: ModelShape, batch_size: int, budget_bytes: int, **kwargs: Any) -> int:
    """The largest multiple of :data:`LENGTH_QUANTUM` whose predicted peak fits (0 if none does)."""
    def fits(n: int) -> bool:
        return predict(shape, n * LENGTH_QUANTUM, batch_size, **kwargs).peak_bytes <= budget_bytes

    low, high = 0, MAX_SEARCH_LENGTH // LENGTH_QUANTUM  # the peak grows with length: bisect
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low * LENGTH_QUANTUM


def largest_batch(shape: ModelShape, max_length: int, budget_bytes: int, **kwargs: Any) -> int:
    """The largest batch of pairs at ``max_length`` whose predicted peak fits (0 if none does)."""
    low, high = 0, MAX_SEARCH_BATCH
    while low < high:
        mid = (low + high + 1) // 2
        ok = predict(shape, max_length, mid, **kwargs).peak_bytes <= budget_bytes
        low, high = (mid, high) if ok else (low, mid - 1)
    return low


PARTS = (
    ("4-bit weights + quantisation statistics", lambda f: f.weights_4bit + f.quant_stats),
    ("full-precision parameters (embedding, norms, lm_head)", lambda f: f.full_precision),
    ("LoRA weights", lambda f: f.lora_weights),
    ("LoRA gradients", lambda f: f.lora_grads),
    ("optimizer states (AdamW, 2 per LoRA weight)", lambda f: f.optimizer_states),
    ("activations: checkpointed layer boundaries", lambda f: f.boundary_activations),
    ("activations: one layer recomputed in backward", lambda f: f.layer_activations),
    ("logits chunk (and its gradient)", lambda f: f.logits_chunk),
)


def _gib(value: float) -> str:
    return f"{value / GIB:,.2f}"


def render(
    model: str,
    shape: ModelShape,
    max_length: int,
    batch_size: int,
    budget_gib: float | None,
    device_kind: str,
    **kwargs: Any,
) -> str:
    """The plan as text: parts, floors and predictions in GiB for both variants, and what fits."""
    preds = {v: predict(shape, max_length, batch_size, variant=v, **kwargs) for v in VARIANTS}
    params = shape.total_params / 1e9
    overhead = kwargs.get("overhead", OVERHEAD)
    lines = [
        f"model:     {model} ({params:.2f}B parameters; {shape.layers} layers, hidden {shape.hidden}, "
        f"vocabulary {shape.vocab})",
        f"step:      --step {STEP_MODE} (one side of the batch at a time), {batch_size} pair(s) of "
        f"{max_length} tokens per side, LoRA r={kwargs.get('lora_r', 16)} on every linear layer, AdamW, "
        f"gradient checkpointing, logits chunk {kwargs.get('chunk_size', 64)}",
        f"overhead:  x{overhead:.2f} on the floor ({OVERHEAD_SOURCE})",
        "",
        "| part (GiB) | float32 residual | bf16 residual |",
        "|---|---:|---:|",
    ]
    for name, part in PARTS:
        lines.append(f"| {name} | {_gib(part(preds['float32'].floor))} | {_gib(part(preds['bf16'].floor))} |")
    rows = (
        ("floor: loaded model", lambda p: p.floor.resident_bytes),
        ("floor: first step above the loaded model", lambda p: p.floor.step_bytes),
        ("floor: loaded model + steady step", lambda p: p.floor.total_bytes),
        (f"predicted first step above the loaded model (x{overhead:.2f})", lambda p: p.step_bytes),
        ("predicted peak (loaded + steady step x overhead + reserve)", lambda p: p.peak_bytes),
    )
    for name, value in rows:
        lines.append(f"| **{name}** | **{_gib(value(preds['float32']))}** | **{_gib(value(preds['bf16']))}** |")
    lines += ["", "| step mode: predicted peak (GiB), worst case | float32 residual | bf16 residual |", "|---|---:|---:|"]
    for mode in AUTO_MODES:
        peak = {v: predict_mode(shape, max_length, batch_size, mode, variant=v, **kwargs).peak_bytes for v in VARIANTS}
        lines.append(f"| --step {mode} | {_gib(peak['float32'])} | {_gib(peak['bf16'])} |")
    lines.append(f"  shared: one row per pair at its widest ({shared_row_tokens(max_length)} tokens: prompt + both "
                 "replies); natural data packs several pairs into shorter rows. The overhead was fitted on split only.")
    lines.append(f"  --step auto takes shared only where rows hold at most {SHARED_MAX_SHARE:g} of the two sides' tokens "
                 "(a shared prompt): never at this worst case.")
    if budget_gib is not None:
        budget = int(budget_gib * GIB)
        for variant in VARIANTS:
            mode = auto_mode(shape, max_length, batch_size, budget, variant=variant, **kwargs)
            lines.append(f"  --step auto in {budget_gib:g} GiB, {variant}: {mode or 'nothing fits'} at the worst case")
        for variant, width in VARIANTS.items():
            # What the default gradient_checkpointing 'auto' would do with the memory left after loading:
            # off means more than these predictions (which assume checkpointing) but within its headroom.
            free = max(0, budget - preds[variant].floor.resident_bytes - preds[variant].reserve_bytes)
            choice = choose_checkpointing("auto", shape, max_length, batch_size, width, True, free)
            lines.append(f"  {variant}: {choice.describe()}")
        lines += ["", f"fits in {budget_gib:g} GiB of {device_kind} (reserve {kwargs.get('reserve_gib', 0.0):g} GiB "
                      "for the process included):"]
        for variant, pred in preds.items():
            verdict = "fits" if pred.peak_bytes <= budget else "does NOT fit"
            length = largest_length(shape, batch_size, budget, variant=variant, **kwargs)
            batch = largest_batch(shape, max_length, budget, variant=variant, **kwargs)
            lines.append(
                f"  {variant:>7}: {max_length} tokens x batch {batch_size} {verdict}; largest max_length at batch "
                f"{batch_size}: {length or 'none'}; largest batch at {max_length} tokens: {batch or 'none'}"
            )
        lines.append("  this project trains the float32 variant on a CPU and the bf16 one on a CUDA GPU with bfloat16 "
                     "compute (model.residual_dtype)")
    return "\n".join(lines)
