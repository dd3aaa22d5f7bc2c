"""The evaluations inside a training run: before, periodic (with best-checkpoint selection) and after.

``train.run`` calls :meth:`RunEvaluator.before`, :meth:`~RunEvaluator.periodic` and
:meth:`~RunEvaluator.finish`; the maths is ``scoring.py`` (preference metrics), ``health.py``
(greedy generation) and ``selection.py`` (best checkpoint). At the end the base and the
adapter are compared on every held-out pair with paired intervals and on the health prompts,
the markdown table is printed, and ``evaluation.json`` / ``evaluation.md`` land in the run
directory. The base's figures come from the ``before`` evaluation (a fresh LoRA adapter is the
identity), or, in a resumed run, from the same model with the adapter switched off.

Under DDP rank 0 alone evaluates (every rank holds the whole weights). Under FSDP2 a forward
gathers each layer's weights from every rank, so every rank runs the same evaluation (the
same pairs and prompts, generation kept in step across ranks) and rank 0 alone logs and
writes (``writes``).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..config import OrpoConfig, row_tokens
from ..core.files import atomic_write_text
from ..data.collate import TokenizedPair
from ..training.metrics import MetricsLogger
from . import base_cache
from .health import HealthResult, generation_health, select_prompts, side_by_side
from .report import markdown_report
from .scoring import EVAL_FIELDS, PairScores, compare_scores, score_pairs, summarise_scores
from .selection import BestCheckpoint

if TYPE_CHECKING:
    from ..training.sharded_state import ShardedModel


class RunEvaluator:
    """Held-out pairs and health prompts of one run, and what has been measured on them so far."""

    def __init__(
        self, model: torch.nn.Module, tokenizer, cfg: OrpoConfig, eval_tok: Sequence[TokenizedPair],
        held_out: Sequence[Any], device: torch.device, run_dir: Path, metrics_log: MetricsLogger,
        log: Callable[[str], None], source: str = "", resumed_step: int = 0,
        sharded: ShardedModel | None = None, writes: bool = True,
    ):
        self.model, self.tokenizer, self.cfg, self.device = model, tokenizer, cfg, device
        self.sharded, self.writes = sharded, writes
        self.pairs = list(eval_tok)
        self.run_dir, self.metrics_log, self.log = Path(run_dir), metrics_log, log
        self.where = {"data": source, "held_out": len(held_out), "evaluated": len(self.pairs)}
        self.prompts = (
            select_prompts(held_out, tokenizer, cfg.health_prompts, cfg.max_prompt_length)
            if cfg.health_prompts and self.pairs else []
        )
        self.base_scores: PairScores | None = None
        self.base_health: HealthResult | None = None
        self.cache_key: str | None = None
        self.best = BestCheckpoint(run_dir, resumed_step) if cfg.select_best and self.pairs else None

    # -- measurements ------------------------------------------------------------------------
    def _scores(self, pairs: Sequence[TokenizedPair] | None = None) -> PairScores:
        cfg = self.cfg
        return score_pairs(
            self.model, self.pairs if pairs is None else list(pairs), self.tokenizer.pad_token_id, self.device, cfg.eval_batch_size,
            cfg.logits_chunk_size, cfg.nll_over_prompt, pad_to_multiple_of=cfg.pad_to_multiple_of,
            forward=self.sharded.root if self.sharded is not None else None,  # through FSDP2's hooks
            progress=self.writes,  # one progress bar, rank 0's
            shared=cfg.step in ("shared", "auto"), pack_tokens=row_tokens(cfg),  # the prompt once
        )

    def _health(self) -> HealthResult | None:
        if not self.prompts:
            return None
        # generate() calls the model, not the sharded root: the root's weights are gathered by hand.
        with self.sharded.full_root() if self.sharded is not None else contextlib.nullcontext():
            return generation_health(self.model, self.tokenizer, self.prompts, self.cfg.health_max_new_tokens,
                                     self.cfg.eval_batch_size, synced=self.sharded is not None)

    def _base(self) -> tuple[PairScores, HealthResult | None]:
        """The base's scores and health: remembered from ``before`` or cached, else measured with the adapter off."""
        if self.base_scores is None and self._from_cache():
            return self.base_scores, self.base_health
        if self.base_scores is None or (self.prompts and self.base_health is None):
            with self.model.disable_adapter():
                if self.base_scores is None:
                    self.base_scores = self._scores()
                if self.prompts and self.base_health is None:
                    self.base_health = self._health()
            self._to_cache()
        return self.base_scores, self.base_health

    # -- the base's evaluation cache (base_cache.py) --------------------------------------------
    def _cache_allowed(self) -> bool:
        # FSDP2: every rank must run the same forwards in step, so no rank may skip them alone.
        return bool(getattr(self.cfg, "eval_cache", False)) and self.sharded is None

    def _caches(self) -> bool:
        return self._cache_allowed() and bool(self.pairs)

    def _settings(self) -> dict[str, Any]:
        return {name: getattr(self.cfg, name) for name in EVAL_FIELDS}

    def _from_cache(self) -> bool:
        """Fill the base's scores and health from the cache; True on a hit (and it says so)."""
        if not self._caches():
            return False
        self.cache_key = base_cache.cache_key(self.model, self.tokenizer, self.cfg, self.pairs, self.prompts,
                                              self.device)
        hit = base_cache.load(self.cache_key)
        if hit is None or len(hit[0].chosen_logps) != len(self.pairs) or (self.prompts and hit[1] is None):
            return False
        self.base_scores, self.base_health = hit[0], hit[1] if self.prompts else None
        self.log(f"eval: the base's scores on {len(self.pairs)} held-out pairs"
                 f"{' and its health replies' if self.base_health else ''} come from the cache "
                 f"({base_cache.cache_dir() / self.cache_key[:16]}...); --no-eval-cache recomputes them")
        return True

    def _to_cache(self) -> None:
        if self._caches() and self.writes and self.cache_key is not None and self.base_scores is not None:
            if base_cache.store(self.cache_key, self.base_scores, self.base_health) is None:
                self.log(f"eval: could not write the base's evaluation to {base_cache.cache_dir()}; not cached")

    def _record(self, tag: str, step: int, metrics: dict[str, float], health: HealthResult | None,
                **extra: Any) -> None:
        healthy = {f"health_{k}": v for k, v in health.metrics.items()} if health is not None else {}
        self.metrics_log.log({"step": step, "split": "eval", "tag": tag, **metrics, **healthy, **extra})
        line = (f"eval ({tag}, step {step}, {metrics['pairs']} pairs): reward accuracy {metrics['reward_accuracy']:.3f} "
                f"[{metrics['reward_accuracy_low']:.3f}, {metrics['reward_accuracy_high']:.3f}], margin "
                f"{metrics['reward_margin']:+.4f}, log-odds ratio {metrics['log_odds_ratio']:+.3f}, "
                f"nll {metrics['nll']:.3f}, loss {metrics['loss']:.4f}")
        if health is not None:
            line += (f"; health: ended {health.metrics['ended_rate']:.2f}, seq-rep-4 {health.metrics['seq_rep_4']:.3f}"
                     f", distinct-2 {health.metrics['distinct_2']:.3f}")
        self.log(line)

    # -- the run's three moments -------------------------------------------------------------
    def before(self, step: int) -> dict[str, float] | None:
        """Evaluate the untrained model (= the base) and remember its per-pair scores and health."""
        if not self.pairs:
            return None
        if not self._from_cache():
            self.base_scores = self._scores()
            self.base_health = self._health()
            self._to_cache()
        metrics = summarise_scores(self.base_scores, self.cfg.beta)
        self._record("before", step, metrics, self.base_health)
        return metrics

    def periodic(self, step: int) -> dict[str, float] | None:
        if not self.pairs:
            return None
        metrics = summarise_scores(self._scores(), self.cfg.beta)
        health = self._health() if self.best is not None else None
        self._record("periodic", step, metrics, health)
        if self.best is not None:
            self._consider(step, metrics, health)
        return metrics

    def _consider(self, step: int, metrics: dict[str, float], health: HealthResult | None) -> None:
        _, base_health = self._base()
        kept, why = self.best.consider(self.model, step, metrics, health and health.metrics,
                                       base_health and base_health.metrics, self.sharded)
        self.log(f"select_best: {why}")

    def finish(self, step: int) -> tuple[dict[str, float] | None, dict[str, Any] | None]:
        """Evaluate the adapter to ship (the best healthy checkpoint with ``select_best``), print the table.

        Returns ``(after metrics, full result)``; the result is what ``report.markdown_report`` reads.
        """
        if not self.pairs:
            return None, None
        scores = self._scores()
        metrics, health = summarise_scores(scores, self.cfg.beta), self._health()
        selected = step
        if self.best is not None:
            self._consider(step, metrics, health)
            if self.best.step is None:
                self.log("select_best: no evaluated checkpoint passed the health gate; shipping the last step's")
            elif self.best.step != step:
                self._record("last", step, metrics, health)
                selected = self.best.restore(self.model, self.sharded)
                self.log(f"select_best: shipping step {selected}'s adapter (lowest held-out loss among healthy "
                         f"checkpoints), not the last step's")
                scores = self._scores()
                metrics, health = summarise_scores(scores, self.cfg.beta), self._health()
        self._record("after", step, metrics, health, selected_step=selected)
        base_scores, base_health = self._base()
        result = {
            "settings": self._settings(),
            "pairs": self.where,
            "base": summarise_scores(base_scores, self.cfg.beta),
            "adapter": metrics,
            "change": compare_scores(base_scores, scores, self.cfg.beta),
            "health": side_by_side(base_health, health, self.cfg.health_max_new_tokens) if health else None,
            "selected_step": selected,
            "steps": step,
        }
        self._publish("evaluation", result)
        return metrics, result

    def test(self, step: int, test_tok: Sequence[TokenizedPair], test_count: int, selected: int | None,
             source: str) -> dict | None:
        """Score the adapter to ship and the base once on the test split; ``test.json``/``test.md``.

        The test pairs took no part in training, periodic evaluation or ``select_best``, so
        this is the run's one unbiased figure. No health replies: the gate is a selection tool.
        """
        pairs = list(test_tok)
        if not pairs:
            return None
        scores = self._scores(pairs)
        base = self._test_base(pairs)
        result = {
            "settings": self._settings(),
            "pairs": {"data": source, "held_out": test_count, "evaluated": len(pairs), "split": "test"},
            "base": summarise_scores(base, self.cfg.beta),
            "adapter": summarise_scores(scores, self.cfg.beta),
            "change": compare_scores(base, scores, self.cfg.beta),
            "health": None, "selected_step": selected if selected is not None else step, "steps": step,
        }
        change = result["change"]["reward_accuracy"]
        self.metrics_log.log({"step": step, "split": "test", "pairs": len(pairs),
                              "base_reward_accuracy": result["base"]["reward_accuracy"],
                              "reward_accuracy": result["adapter"]["reward_accuracy"],
                              "reward_accuracy_change": change["change"], "reward_accuracy_change_low": change["low"],
                              "reward_accuracy_change_high": change["high"]})
        self._publish("test", result)
        return result

    def _test_base(self, pairs: list[TokenizedPair]) -> PairScores:
        """The base's scores on the test pairs: from the evaluation cache, else with the adapter off."""
        key = None
        if self._cache_allowed():
            key = base_cache.cache_key(self.model, self.tokenizer, self.cfg, pairs, [], self.device)
            hit = base_cache.load(key)
            if hit is not None and len(hit[0].chosen_logps) == len(pairs):
                self.log(f"test: the base's scores on {len(pairs)} test pairs come from the cache")
                return hit[0]
        with self.model.disable_adapter():
            base = self._scores(pairs)
        if key is not None and self.writes:
            base_cache.store(key, base, None)
        return base

    def _publish(self, name: str, result: dict[str, Any]) -> None:
        """Print the result's table and (rank 0) write ``<name>.json`` and ``<name>.md``."""
        report = markdown_report(result)
        self.log("\n" + report)
        if self.writes:
            atomic_write_text(self.run_dir / f"{name}.json", json.dumps(result, indent=2) + "\n")
            atomic_write_text(self.run_dir / f"{name}.md", report + "\n")
