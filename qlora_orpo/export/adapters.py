"""Self-describing adapter folders: peft's own files plus a card that names and fingerprints the base.

Layout of an adapter directory::

    adapter_config.json          peft's config; ``base_model_name_or_path`` is the hub id where one is known
    adapter_model.safetensors    the LoRA tensors (peft's names)
    README.md                    the card: YAML front matter (hub metadata + ``qlora_orpo:``) and a short text
    tokenizer files              only with ``--chat-template``: the base's tokenizer with the chosen template

Any peft release can load the folder (``PeftModel.from_pretrained(base, dir)``); the card is
what lets :func:`load_adapter` refuse a base the adapter was not trained on. Its front matter
holds, under ``qlora_orpo:``, the base (hub name, the ``--model`` value and its
:func:`fingerprint`), the data (name, sha256, shape, rows), the resolved training config and
the final held-out metrics. Nothing in the folder names a local path (it is made to be
shared); the local paths of the base and the data go to ``<name>.local.json`` beside it
(:data:`LOCAL_SUFFIX`; ``runs/<run>/adapter.local.json`` for a run's adapter).

The fingerprint (``models/fingerprint.py``) and the card (``card.py``) have their own modules.
"""

from __future__ import annotations

import errno
import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.errors import AdapterError, AdapterMismatchError, UserError
from ..core.files import atomic_write_text, make_temp_dir, replace_dir, write_failure
from ..models.fingerprint import (
    FINGERPRINT_FIELDS,
    describe_differences,
    fingerprint,
    fingerprint_differences,
)
from .card import EMBEDDED_HUB_ID, card_metadata, local_paths, parse_card, render_card

if TYPE_CHECKING:  # heavy imports only for type checkers
    import torch
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

    from ..config import OrpoConfig
    from ..data.preferences import PreferenceData

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
CARD_FILE = "README.md"
LOCAL_SUFFIX = ".local.json"  # <adapter dir><this>: the local paths trained from (card.local_paths)
TOKENIZER_FILE = "tokenizer_config.json"  # present when the run chose a chat template (--chat-template)


# ---------------------------------------------------------------------------------------------
# Reading an adapter directory
# ---------------------------------------------------------------------------------------------


@dataclass
class AdapterInfo:
    """What an adapter directory says about itself (after its files were checked)."""

    path: Path
    peft_config: dict[str, Any]
    card: dict[str, Any] | None  # the front matter; None only when the card is missing and not required

    @property
    def base(self) -> dict[str, Any]:
        return self.card["qlora_orpo"]["base"] if self.card else {}

    @property
    def expected_fingerprint(self) -> dict[str, Any] | None:
        return self.base.get("fingerprint")


def read_adapter(adapter_dir: str | Path, require_card: bool = True) -> AdapterInfo:
    """Check the three files of an adapter directory and return their metadata.

    Every problem is an :class:`AdapterError` naming the file: a missing directory or
    ``adapter_config.json``, JSON that does not parse, ``adapter_model.safetensors`` missing or
    unreadable (its tensors are read in full, about 20 MB for r=16 on SmolLM2-135M), a
    ``README.md`` missing (unless ``require_card`` is False) or without front matter.
    """
    from safetensors.torch import load_file

    path = Path(adapter_dir)
    if not path.is_dir():
        raise AdapterError(f"{path}: no such adapter directory")
    refuse_links_out(path)
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterError(f"{config_path}: missing; an adapter directory needs peft's {CONFIG_FILE}")
    try:
        peft_config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{config_path}: cannot read it as JSON ({exc})") from None
    if not isinstance(peft_config, dict) or "peft_type" not in peft_config:
        raise AdapterError(f"{config_path}: not a peft adapter config (no 'peft_type')")
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        raise AdapterError(f"{weights_path}: missing; the adapter's weights must be in {WEIGHTS_FILE}")
    try:
        tensors = load_file(str(weights_path))
    except Exception as exc:  # safetensors raises its own SafetensorError, OSError or ValueError
        raise AdapterError(f"{weights_path}: unreadable safetensors file ({str(exc).splitlines()[0]})") from None
    if not tensors:
        raise AdapterError(f"{weights_path}: holds no tensors")
    card_path = path / CARD_FILE
    if not card_path.is_file():
        if require_card:
            raise AdapterError(f"{card_path}: missing; it records the base the adapter was trained on")
        return AdapterInfo(path, peft_config, None)
    try:
        text = card_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{card_path}: cannot read it ({exc})") from None
    return AdapterInfo(path, peft_config, parse_card(text, card_path))


def refuse_links_out(path: Path) -> None:
    """A symlink in an adapter directory must stay inside it: one that points elsewhere would make
    chat, eval or export read (and an export copy) a file the adapter's owner never shipped."""
    root = path.resolve()
    for entry in sorted(path.iterdir()):
        if entry.is_symlink() and not entry.resolve().is_relative_to(root):
            raise AdapterError(f"{entry}: a symlink to {entry.resolve()}, outside the adapter directory; "
                               "copy the file into the directory instead")


def local_record_path(adapter_dir: Path) -> Path:
    """Where the local paths an adapter was trained from are kept: beside it, not in it."""
    adapter_dir = Path(adapter_dir)
    return adapter_dir.with_name(adapter_dir.name + LOCAL_SUFFIX)


def local_record(adapter_dir: Path) -> dict[str, Any]:
    """The local paths of the base and the data an adapter was trained from (``{}`` if not on this machine)."""
    try:
        record = json.loads(local_record_path(adapter_dir).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def resolve_base(info: AdapterInfo, override: str | None = None) -> str:
    """The local directory of the adapter's base: ``override``, else what the card records.

    In order: the local path trained from (:func:`local_record`, or an older card), if it
    still exists; the ``--model`` value trained with (``"embedded"`` converts the embedded model if needed); the hub name (the embedded
    model's hub id maps to ``"embedded"``); finally peft's ``base_model_name_or_path``.
    """
    from ..models.loader import resolve_model_path

    if override:
        return resolve_model_path(override)
    base = info.base
    local = local_record(info.path).get("base") or {}
    candidates: list[str] = []
    # Cards written before issue 20 recorded the local path in the card itself.
    for path in (local.get("path"), base.get("path")):
        if path and Path(str(path)).is_dir():
            return str(path)
    for value in (local.get("model"), base.get("model"), base.get("name"),
                  info.peft_config.get("base_model_name_or_path")):
        if value:
            candidates.append("embedded" if value == EMBEDDED_HUB_ID else str(value))
    tried: list[str] = []
    for candidate in dict.fromkeys(candidates):
        try:
            return resolve_model_path(candidate)
        except UserError as exc:
            tried.append(str(exc))
    raise AdapterError(
        f"{info.path}: cannot find the base it was trained on ({'; '.join(tried) or 'the card names none'}); "
        "pass the base explicitly"
    )


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------


def save_adapter(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    cfg: OrpoConfig | None,
    adapter_dir: str | Path,
    data: PreferenceData | None = None,
    metrics: dict[str, Any] | None = None,
    evaluation: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``model``'s adapter as a self-describing directory; returns ``adapter_dir``.

    ``state_dict``: the weights to write instead of the model's own, keyed as its
    ``state_dict()`` (a sharded model's, gathered whole: ``sharded_state.py``).

    The files are written into a temporary sibling directory, read back, and exchanged with
    ``adapter_dir`` (``core/files.py``), so ``adapter_dir`` is never half written: a previous
    adapter there is replaced only once the new one is complete. A failed write (a full disk)
    is an :class:`AdapterError` naming the file, and leaves the previous adapter as it was.
    ``adapter_config.json`` names the base by its hub id where one is
    known, else by its directory's name; the local paths trained from go to the local record
    beside the directory (:data:`LOCAL_SUFFIX`), never into it.
    """
    from safetensors import SafetensorError

    from ..models.loader import quiet_checkpointing_renames

    target = Path(adapter_dir)
    meta = card_metadata(model, tokenizer, cfg, data, metrics, evaluation)
    base_name = meta.get("base_model") or meta["qlora_orpo"]["base"]["name"]
    tmp = make_temp_dir(target)
    writing = WEIGHTS_FILE  # what a failed write was writing, where its error does not say (safetensors)
    try:
        with quiet_checkpointing_renames():
            if state_dict is None:
                model.save_pretrained(str(tmp), safe_serialization=True)
            else:
                model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state_dict)
        config_path = tmp / CONFIG_FILE
        peft_config = json.loads(config_path.read_text())
        if base_name:  # peft wrote the local path it was loaded from
            peft_config["base_model_name_or_path"] = base_name
        atomic_write_text(config_path, json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
        if cfg is not None and cfg.chat_template:
            # The chosen template travels with the adapter: chat, eval and export read it from here.
            writing = "the tokenizer files"
            tokenizer.save_pretrained(str(tmp))
        atomic_write_text(tmp / CARD_FILE, render_card(meta))  # replaces peft's generic card
        writing = "the directory (reading it back, or renaming it into place)"
        check_written_safetensors(tmp)
        replace_dir(tmp, target)
    except (OSError, SafetensorError) as exc:  # a full disk: safetensors raises its own error type
        kept = "the previous adapter there is kept" if (target / WEIGHTS_FILE).is_file() else "none was there before"
        message = write_failure(target, exc, kept, writing)
        shutil.rmtree(tmp, ignore_errors=True)
        raise AdapterError(message) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    record = local_record_path(target)
    try:
        atomic_write_text(record, json.dumps(local_paths(model, cfg, data), indent=2) + "\n")
    except OSError as exc:  # the adapter itself is whole; only the note of where it came from is missing
        raise AdapterError(f"{record}: could not write it ({exc.strerror}); the adapter {target} is written, "
                           "but export and eval will need the base passed explicitly") from exc
    return target


def adapter_tokenizer_dir(adapter_dir: str | Path) -> Path | None:
    """``adapter_dir`` when it holds the tokenizer saved with a chosen chat template, else None (use the base's)."""
    path = Path(adapter_dir)
    return path if (path / TOKENIZER_FILE).is_file() else None


def check_written_safetensors(directory: Path, full: bool = True) -> None:
    """Read back every safetensors file written under ``directory`` before it is published.

    ``full`` loads every tensor (an adapter: megabytes); otherwise only the headers and the
    file lengths they imply (a merged model: gigabytes). Raises ``SafetensorError`` or
    ``OSError`` naming nothing, caught with the write's own errors.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    for path in sorted(directory.rglob("*.safetensors")):
        if full:
            if not load_file(str(path)):
                raise OSError(errno.EIO, "holds no tensors after writing", str(path))
        else:
            with safe_open(str(path), "pt") as handle:
                handle.keys()


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def check_base(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, info: AdapterInfo, force: bool = False
) -> list[str]:
    """Compare the base's fingerprint with the card's; returns the fields that differ.

    Raises :class:`AdapterMismatchError` naming them, unless ``force``: then it warns
    (``UserWarning``) and returns them.
    """
    expected = info.expected_fingerprint
    card_path = info.path / CARD_FILE
    if expected is None:  # only possible with require_card=False, i.e. force
        warnings.warn(f"{card_path}: missing, so the base cannot be checked; loading anyway (force)",
                      UserWarning, stacklevel=3)
        return list(FINGERPRINT_FIELDS)
    actual = fingerprint(model, tokenizer)
    differ = fingerprint_differences(expected, actual)
    if not differ:
        return []
    message = (f"{info.path}: trained on another base ({info.base.get('name')}): "
               f"{describe_differences(expected, actual, differ)}")
    if not force:
        raise AdapterMismatchError(message + "; load the base it was trained on, or pass force=True (--force)", differ)
    warnings.warn(message + "; loading anyway (force)", UserWarning, stacklevel=3)
    return differ


def load_adapter(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    adapter_dir: str | Path,
    force: bool = False,
    is_trainable: bool = False,
    adapter_name: str = "default",
) -> PeftModel:
    """Wrap the plain transformers ``model`` with the adapter in ``adapter_dir``, after checking the base.

    The base's :func:`fingerprint` must equal the card's, or :class:`AdapterMismatchError`
    names the fields that differ; ``force=True`` loads anyway with a warning (and also
    accepts a directory without a card). Missing or unreadable files raise
    :class:`AdapterError` naming the file. Load the base in float32 or 4-bit: a bfloat16 copy
    of a float32 checkpoint has other embedding bytes.
    """
    from ..models.bnb_cpu import import_bitsandbytes_quietly

    import_bitsandbytes_quietly(required=False)  # before peft imports it: without its hub-kernel warning
    from peft import PeftModel

    info = read_adapter(adapter_dir, require_card=not force)
    check_base(model, tokenizer, info, force=force)
    weights = info.path / WEIGHTS_FILE
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            peft_model = PeftModel.from_pretrained(
                model, str(info.path), adapter_name=adapter_name, is_trainable=is_trainable
            )
        except (RuntimeError, ValueError, KeyError) as exc:
            raise AdapterMismatchError(
                f"{weights}: the adapter does not fit this base ({str(exc).strip().splitlines()[0]})"
            ) from exc
    for warning in caught:
        text = str(warning.message)
        if "missing adapter keys" in text and not force:
            raise AdapterMismatchError(f"{weights}: {text.splitlines()[0]}")
        if issubclass(warning.category, FutureWarning) and "gradient_checkpointing" in text:
            continue  # transformers 5 telling peft about renamed methods (see model.quiet_checkpointing_renames)
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    # The forward training and its evaluations ran (lora_forward.py): `eval` reproduces the run's
    # held-out figures to the bit, and chat is faster. In float32 (merged export) it is peft's.
    from ..models.lora_forward import use_lean_lora_forward

    use_lean_lora_forward(peft_model)
    return peft_model
