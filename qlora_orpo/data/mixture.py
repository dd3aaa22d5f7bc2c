"""The pairs a run trains and evaluates on: one or several sources, and a held-out share or an eval file.

``cfg.data`` and ``cfg.eval_data`` name one source or several (``config/sources.py``). Each source
is read by :func:`~qlora_orpo.data.preferences.load_preferences` with its own field names, split and
``max_rows``; several are concatenated and shuffled together with ``random.Random(seed)``, so the
mixture is the same for the same seed and every micro-batch can mix them. One source keeps its
file order, exactly as before several were possible. Every pair keeps its ``source``, and with
several sources every skipped row names its source, so each message points at one file's row.

The held-out pairs are, without ``eval_data``, the hash share of the training pairs
(:func:`~qlora_orpo.data.preferences.split_holdout`); with it, all of ``eval_data``, and training
keeps all of ``data``. :func:`shared_pairs` counts the pairs that are in both. A ``test_fraction``
takes its test split out of ``data`` first (:func:`~qlora_orpo.data.preferences.split_test`, the
other end of the same hash), so neither training nor the held-out share ever holds a test pair.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from ..config.sources import DataSource, DataValue, describe_value, parse_sources
from .preferences import PreferenceData, PreferencePair, load_preferences, split_holdout, split_test


def sources_of(cfg: Any, value: DataValue | None = None) -> list[DataSource]:
    """The sources ``value`` (default ``cfg.data``) names, unset keys taken from ``cfg``'s data fields."""
    defaults = DataSource(path="", prompt_field=cfg.prompt_field, chosen_field=cfg.chosen_field,
                          rejected_field=cfg.rejected_field, split=cfg.data_split)
    return parse_sources(cfg.data if value is None else value, defaults)


def load_sources(sources: list[DataSource], strict: bool = False, seed: int = 0) -> PreferenceData:
    """Read every source; one is returned as read, several concatenated and shuffled by ``seed``.

    Raises :class:`~qlora_orpo.core.errors.DataError` naming the source (and with ``strict`` the
    row and field) when a source cannot be read or holds no usable pair.
    """
    parts = [
        load_preferences(s.path, prompt_field=s.prompt_field, chosen_field=s.chosen_field,
                         rejected_field=s.rejected_field, split=s.split, strict=strict, max_rows=s.max_rows)
        for s in sources
    ]
    if len(parts) == 1:
        return parts[0]
    pairs = [pair for part in parts for pair in part.pairs]
    random.Random(seed).shuffle(pairs)  # the mixture's order; training reshuffles it per epoch anyway
    skipped = [replace(row, source=part.source) for part in parts for row in part.skipped]
    shapes = sorted({part.shape for part in parts})
    return MixedData(pairs, skipped, shapes[0] if len(shapes) == 1 else "mixed: " + ", ".join(shapes),
                     " + ".join(part.source for part in parts), sum(part.total_rows for part in parts), parts)


@dataclass
class MixedData(PreferenceData):
    """:class:`PreferenceData` of several sources; ``parts`` holds each source's own, in the given order."""

    parts: list[PreferenceData] | None = None


def parts_of(data: PreferenceData) -> list[PreferenceData]:
    """Each source's own data: ``data`` itself for one source."""
    return getattr(data, "parts", None) or [data]


@dataclass
class RunData:
    """What a run reads: the training data, and the pairs it trains and evaluates on."""

    data: PreferenceData
    train: list[PreferencePair]
    held_out: list[PreferencePair]
    eval_data: PreferenceData | None  # the --eval-data file's, when one is given
    test: list[PreferencePair] = field(default_factory=list)  # the test_fraction share of data: scored once, at the end

    @property
    def held_out_from(self) -> str:
        """Where the held-out pairs come from, for logs and reports."""
        if self.eval_data is not None:
            return f"the evaluation data {self.eval_data.source}"
        return f"a hash share of {self.data.source}"


def load_run_data(cfg: Any) -> RunData:
    """``cfg.data`` (train) and ``cfg.eval_data`` or the ``eval_fraction`` hash share (held out),
    with ``cfg.system_prompt`` given to the prompts without a system turn."""
    data = load_sources(sources_of(cfg), cfg.strict, cfg.seed)
    eval_data = load_eval_data(cfg) if cfg.eval_data else None
    # Before the system prompt, so that the splits are the same with or without one.
    rest, test = split_test(data.pairs, getattr(cfg, "test_fraction", 0.0))
    if eval_data is None:
        train, held = split_holdout(rest, cfg.eval_fraction)
    else:
        train, held = rest, list(eval_data.pairs)
    return RunData(data, add_system_prompt(train, cfg.system_prompt), add_system_prompt(held, cfg.system_prompt),
                   eval_data, add_system_prompt(test, cfg.system_prompt))


def add_system_prompt(pairs: list[PreferencePair], text: str) -> list[PreferencePair]:
    """``pairs`` with a system turn ``text`` first in every prompt that has none (unchanged for ``""``)."""
    if not text:
        return pairs
    system = {"role": "system", "content": text}
    return [p if any(m["role"] == "system" for m in p.prompt) else replace(p, prompt=(system, *p.prompt))
            for p in pairs]


def load_eval_data(cfg: Any) -> PreferenceData:
    """The ``eval_data`` sources, read like ``data`` (several are shuffled by seed too)."""
    return load_sources(sources_of(cfg, cfg.eval_data), cfg.strict, cfg.seed)


def pair_key(pair: PreferencePair) -> tuple[Any, ...]:
    """What makes two pairs the same pair: the prompt's messages and both responses, not where they came from."""
    return (tuple(tuple(sorted(m.items())) for m in pair.prompt), pair.chosen, pair.rejected)


def shared_pairs(train: list[PreferencePair], held_out: list[PreferencePair]) -> list[PreferencePair]:
    """The held-out pairs that also occur among the training pairs (each held-out occurrence once)."""
    seen = Counter(pair_key(p) for p in train)
    return [p for p in held_out if seen[pair_key(p)]]


def held_out_source(cfg: Any, data: PreferenceData) -> str:
    """Where the held-out pairs come from: the ``eval_data`` sources, else the training data."""
    return describe_value(cfg.eval_data) if cfg.eval_data else str(data.source)


def describe_shared(shared: list[PreferencePair]) -> str:
    """One warning line for :func:`shared_pairs`' result (empty when nothing is shared)."""
    if not shared:
        return ""
    first = shared[0]
    return (f"warning: {len(shared)} evaluation pair(s) also occur in the training data (e.g. {first.source}, "
            f"row {first.row}); their scores measure memorisation, not generalisation")
