"""One benchmark configuration (:class:`BenchSpec`), the plan of configurations, and the fixed pair."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from ..config import EMBEDDED, OrpoConfig
from ..data.collate import TokenizedPair
from ..data.templating import tokenize_pair

METHODS = ("trl", "joint", "sequential", "split", "shared")
DEFAULT_METHODS = ("trl", "joint", "split")
LENGTHS = (256, 512, 1024, 2048)
QUICK_LENGTHS = (32, 64)
# "mimalloc" runs with memory.MIMALLOC_ENV (what training uses), "mimalloc-default" without it.
ALLOCATORS = ("glibc", "trim", "jemalloc", "mimalloc", "mimalloc-default")
PRELOADED = ("jemalloc", "mimalloc", "mimalloc-default")  # allocators the parent puts in LD_PRELOAD
PEER = "trl"


@dataclass(frozen=True)
class BenchSpec:
    """One configuration, as passed to a worker (JSON on its command line)."""

    method: str  # "trl", "joint", "sequential" or "split"
    max_length: int
    model: str = EMBEDDED
    quant: str = "nf4"
    compute_dtype: str = "auto"
    device: str = "auto"
    allocator: str = "trim"  # one of ALLOCATORS
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

    @property
    def preloaded_allocator(self) -> str | None:
        """The allocator library the worker runs under ("jemalloc", "mimalloc"), or None for glibc."""
        return self.allocator.removesuffix("-default") if self.allocator in PRELOADED else None

    def config(self) -> OrpoConfig:
        """The training config this configuration loads its model with."""
        return OrpoConfig(
            model=self.model, data=self.data, quant=self.quant, compute_dtype=self.compute_dtype,
            device=self.device, lora_r=16, lora_alpha=32, lora_dropout=0.0, lora_targets="all-linear",
            gradient_checkpointing=True, max_length=self.max_length, max_prompt_length=prompt_length(self.max_length),
            logits_chunk_size=self.chunk_size, beta=self.beta, seed=self.seed, nll_over_prompt=True,
            step=self.method if self.method != PEER else "joint",
            # A preloaded allocator is checked by the worker itself (an error row, not a raise).
            cpu_allocator="glibc" if self.preloaded_allocator else self.allocator,
        )


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
    from ..data.preferences import load_preferences

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
