"""The ``data`` and ``eval_data`` values: one source, or several with their own field names, split and size.

A value is one of (the same in a YAML/JSON config, on the command line and in the API):

* a string: a file, a saved ``datasets`` directory, a dataset name or ``embedded``, read with the
  config's ``prompt_field``/``chosen_field``/``rejected_field`` and ``data_split``;
* a list of such strings (``--data a.jsonl b.csv``);
* a list whose items may also be mappings with ``path`` and any of :data:`SOURCE_KEYS`, as
  axolotl's ``datasets:`` list::

      data:
        - path: hh.jsonl
        - {path: ultra.parquet, prompt_field: question, split: test, max_rows: 500}

This module only checks the structure (config is below ``data``); ``data/mixture.py`` reads the
sources. A list of one plain string is stored as that string, so one source's recorded config
stays as it always was.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..core.errors import ConfigError

SOURCE_KEYS = ("path", "prompt_field", "chosen_field", "rejected_field", "split", "max_rows")
DataValue = str | list[str | dict[str, Any]]


@dataclass(frozen=True)
class DataSource:
    """One source of preference pairs, its defaults filled in from the config's own fields."""

    path: str
    prompt_field: str = "prompt"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    split: str = "train"
    max_rows: int = 0  # read at most this many rows of this source (0 = all)


def normalise_data_value(value: Any, name: str) -> DataValue:
    """``value`` checked and in its stored form: a string, or a list of strings and mappings.

    Raises :class:`ConfigError` naming ``name`` (and the item) for anything else.
    """
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, str):
        return value
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{name}: expected a source (a path or dataset name) or a non-empty list of them, "
                          f"got {value!r}")
    items: list[str | dict[str, Any]] = []
    for index, item in enumerate(value, start=1):
        where = f"{name}[{index}]"
        if isinstance(item, str) and item.strip():
            items.append(item)
        elif isinstance(item, dict):
            items.append(_check_mapping(item, where))
        else:
            raise ConfigError(f"{where}: expected a path or a mapping with 'path', got {item!r}")
    if len(items) == 1 and isinstance(items[0], str):
        return items[0]
    return items


def _check_mapping(item: dict[str, Any], where: str) -> dict[str, Any]:
    unknown = [k for k in item if k not in SOURCE_KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; a source takes {', '.join(SOURCE_KEYS)}")
    if not isinstance(item.get("path"), str) or not item["path"].strip():
        raise ConfigError(f"{where}: needs 'path' (a file, a saved datasets directory or a dataset name)")
    for key in SOURCE_KEYS[1:5]:
        if key in item and not isinstance(item[key], str):
            raise ConfigError(f"{where}.{key}: expected a string, got {item[key]!r}")
    if "max_rows" in item:
        rows = item["max_rows"]
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
            raise ConfigError(f"{where}.max_rows: expected an integer >= 0, got {rows!r}")
    return dict(item)


def parse_sources(value: DataValue, defaults: DataSource) -> list[DataSource]:
    """The sources a (normalised) ``data``/``eval_data`` value names; unset keys come from ``defaults``."""
    items = [value] if isinstance(value, str) else value
    sources = []
    for item in items:
        given = {"path": item} if isinstance(item, str) else item
        sources.append(DataSource(**{**defaults.__dict__, **given}))
    return sources


def describe_value(value: DataValue) -> str:
    """A short name for a data value: the path, or the paths joined by `` + ``."""
    items = [value] if isinstance(value, str) else value
    return " + ".join(item if isinstance(item, str) else item["path"] for item in items)
