"""Where preference rows come from: files by suffix, saved ``datasets`` directories, local dataset names.

Each reader yields ``(1-based row number, row object or RowProblem)``; :func:`read_rows` picks
the reader from what ``source`` names (see ``preferences.py`` for the row numbering rules). The hub is
never contacted: offline, each ``load_dataset`` attempt would otherwise spend ~20 s retrying.
"""

from __future__ import annotations

import csv
import gzip
import json
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from ..core.errors import DataError

ACCEPTED = ".jsonl, .json, .csv (each optionally .gz), .parquet, or a saved `datasets` directory"
_TEXT_FORMATS = ("jsonl", "json", "csv")  # the formats that may also be gzipped


class RowProblem(Exception):
    """Why one row cannot become a pair; raised while parsing a row, or yielded by a reader."""

    def __init__(self, field: str | None, reason: str):
        super().__init__(reason)
        self.field, self.reason = field, reason



def read_rows(source: str, split: str) -> Iterator[tuple[int, Any]]:
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return _read_datasets(str(path), split, from_disk=True)
        return _read_datasets(str(path), split, from_disk=False)  # e.g. a folder of data files
    if path.is_file():
        fmt = _format_of(path)
        if fmt is None:
            suffix = "".join(path.suffixes[-2:]) or "(no suffix)"
            raise DataError(source, f"unknown data format '{suffix}'; accepted: {ACCEPTED}")
        return _READERS[fmt](path, source)
    if _looks_like_path(source):
        raise DataError(source, "no such file or directory")
    return _read_datasets(source, split, from_disk=False)


def _format_of(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    for fmt in _TEXT_FORMATS:
        if name.endswith((f".{fmt}", f".{fmt}.gz")):
            return fmt
    return None


def _looks_like_path(data: str) -> bool:
    """True unless ``data`` could be a dataset name such as ``imdb`` or ``org/name``."""
    if _format_of(Path(data)) is not None or data.lower().endswith(".gz"):
        return True
    return data.startswith(("/", ".", "~")) or "\\" in data or data.count("/") > 1


def _open_binary(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")


@contextmanager
def _readable(source: str) -> Iterator[None]:
    """Turn I/O and decompression failures into a DataError naming the file."""
    try:
        yield
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(source, f"cannot read file: {exc}") from None


def _read_jsonl(path: Path, source: str) -> Iterator[tuple[int, Any]]:
    # Line by line, decoded one line at a time: a bad byte or a broken line costs one row, not the file.
    # surrogateescape keeps undecodable bytes as lone surrogates, which the row checks then report.
    with _readable(source), _open_binary(path) as stream:
        for number, raw in enumerate(stream, start=1):
            line = raw.decode("utf-8", errors="surrogateescape").strip()
            if number == 1:
                line = line.lstrip("\ufeff")  # a byte-order mark that editors on Windows like to add
            if not line:
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                yield number, RowProblem(None, f"invalid JSON: {exc.msg} at column {exc.colno}")


def _read_json(path: Path, source: str) -> Iterator[tuple[int, Any]]:
    with _readable(source), _open_binary(path) as stream:
        text = stream.read().decode("utf-8", errors="surrogateescape").lstrip("\ufeff")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        hint = " (one JSON object per line? name the file .jsonl)" if exc.msg == "Extra data" else ""
        raise DataError(
            source, f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}{hint}"
        ) from None
    rows = document.get("data") if isinstance(document, dict) else document
    if not isinstance(rows, list):
        raise DataError(source, "expected a JSON list of rows or an object with a 'data' list")
    yield from enumerate(rows, start=1)


def _read_csv(path: Path, source: str) -> Iterator[tuple[int, Any]]:
    # HH transcripts run to tens of kilobytes; the csv module's default cell limit is 128 KiB.
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    with (
        _readable(source),
        opener(path, "rt", encoding="utf-8-sig", errors="surrogateescape", newline="") as text,
    ):
        reader = csv.DictReader(text)
        try:
            yield from enumerate(reader, start=1)
        except csv.Error as exc:
            raise DataError(source, f"cannot parse CSV at line {reader.line_num}: {exc}") from None


def _read_parquet(path: Path, source: str) -> Iterator[tuple[int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    number = 0
    try:
        # Batches keep memory flat for large files; to_pylist turns list<struct> into message dicts.
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                number += 1
                yield number, row
    except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:
        raise DataError(source, f"cannot read Parquet file: {exc}") from None


_READERS = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "parquet": _read_parquet}


@contextmanager
def _local_quiet_datasets() -> Iterator[Any]:
    """Import ``datasets`` (only when needed: it is slow to import) with progress bars off and the hub
    offline, restoring both afterwards. The offline switches are module attributes that datasets and
    huggingface_hub read at call time; the environment variables would be read only at import."""
    import datasets
    import datasets.config
    import huggingface_hub.constants as hub_constants

    bars_were_on = datasets.is_progress_bar_enabled()
    saved = (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE)
    datasets.disable_progress_bars()
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield datasets
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved
        if bars_were_on:
            datasets.enable_progress_bars()


def _read_datasets(source: str, split: str, *, from_disk: bool) -> Iterator[tuple[int, Any]]:
    with _local_quiet_datasets() as datasets:
        try:
            loaded = (
                datasets.load_from_disk(source) if from_disk else datasets.load_dataset(source, split=split)
            )
        except Exception as exc:  # datasets raises a zoo of types here; all mean "cannot use this"
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if from_disk:
                raise DataError(source, f"cannot load saved dataset: {detail}") from None
            raise DataError(
                source,
                "not a file or directory, and datasets.load_dataset could not resolve it locally "
                f"(no hub is reachable; only local files and the datasets cache are used): {detail}",
            ) from None
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(source, f"no split '{split}'; available: {', '.join(loaded)}")
            loaded = loaded[split]
    return enumerate(loaded, start=1)
