"""Merged export: base + adapter -> one plain transformers directory, verified by plain transformers.

:func:`export_merged` loads the base *unquantised in float32* on the CPU (never the 4-bit
weights: adding a LoRA delta to NF4 codes and re-quantising would lose most of it), checks it
against the adapter card's fingerprint, applies the adapter, computes reference logits with
the adapter unmerged, merges (``merge_and_unload``), casts to the requested dtype, and writes
sharded safetensors, ``config.json``, ``generation_config.json``, the tokenizer with its chat
template and a ``README.md`` card. Merging in float32 and rounding once to bfloat16/float16
gives each stored weight the nearest representable value of ``W + s * B @ A``; loading the
base in bfloat16 first would round ``W`` twice. The price is 4 bytes per parameter of CPU
memory while exporting (0.5 GB for SmolLM2-135M, 28 GB for a 7B base).

Verification, before the directory is published: a subprocess that never imports
``qlora_orpo`` (``python -I``, and it checks ``sys.modules``) loads the directory with plain
``transformers``, checks that its tokenizer reproduces our token ids, and computes logits on a
few held-out prompts (the first held-out pairs of the training data, prompt and chosen
response; built-in prompts when the data cannot be read). Both sides compute in float32, so
the difference measures the exported files, not this machine's bfloat16 arithmetic. The
largest absolute logit difference must stay within :func:`tolerance`.
"""

from __future__ import annotations

import gc
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError

from ..core.console import console_logger
from ..core.errors import UserError
from ..core.files import atomic_write_text, make_temp_dir, replace_dir, write_failure
from .adapters import (
    CARD_FILE,
    AdapterInfo,
    adapter_tokenizer_dir,
    check_written_safetensors,
    load_adapter,
    parse_card,
    read_adapter,
    resolve_base,
)
from .verify import (  # noqa: F401  (tolerance and the errors are part of this module's API)
    VERIFY_MAX_TOKENS,
    VERIFY_PROMPTS,
    ExportError,
    ExportVerificationError,
    check_report,
    encode_texts,
    reference_logits,
    tolerance,
    verification_texts,
    verify_with_transformers,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ExportResult:
    out_dir: str
    dtype: str
    max_abs_diff: float  # merged (plain transformers) vs base + unmerged adapter, over all compared logits
    tolerance: float
    adapter_effect: float  # max |logits with adapter - logits without|, to judge what the check can see
    logit_scale: float  # max |reference logit|
    tokens_compared: int
    shards: int
    bytes: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


log = console_logger("export")


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def export_merged(
    adapter_dir: str | Path,
    out_dir: str | Path,
    dtype: str = "float32",
    *,
    base: str | None = None,
    force: bool = False,
    max_shard_size: str | int = "2GB",
    verify: bool = True,
    texts: list[str] | None = None,
    max_tokens: int = VERIFY_MAX_TOKENS,
) -> ExportResult:
    """Merge the adapter in ``adapter_dir`` into its base and write ``out_dir``; see the module docstring.

    ``base`` overrides the base the card names (a directory, ``"embedded"`` or a hub id);
    ``force`` loads the adapter onto a base whose fingerprint differs (with a warning).
    ``texts`` replaces the held-out conversations compared in the verification. The result
    is written into a temporary sibling and exchanged with ``out_dir`` only once verified; an
    existing ``out_dir`` is replaced only if it is an earlier export (it has our card). A failed
    write (a full disk) is an :class:`ExportError` naming the file; the earlier export stays.
    Raises :class:`ExportVerificationError` when the check fails.
    """
    from transformers import AutoTokenizer

    from ..models.loader import load_base

    start = time.perf_counter()
    if dtype not in DTYPES:
        raise ExportError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    out = Path(out_dir)
    _check_output_dir(out)
    info = read_adapter(adapter_dir, require_card=not force)
    base_path = resolve_base(info, base)
    log(f"base {base_path} (float32, CPU); adapter {info.path}")
    try:
        # The adapter's own tokenizer when it carries a chosen chat template; saved as it is.
        tokenizer = AutoTokenizer.from_pretrained(adapter_tokenizer_dir(info.path) or base_path)
    except (OSError, ValueError) as exc:
        raise ExportError(f"base {base_path}: cannot load its tokenizer ({str(exc).splitlines()[0]})") from exc
    # Merging happens in float32 on the CPU, never into 4-bit weights.
    model = load_base(base_path, "none", "cpu", torch.float32)
    peft_model = load_adapter(model, tokenizer, info.path, force=force)
    peft_model.eval()

    if texts is None:
        texts, origin = verification_texts(info, tokenizer)
    else:
        origin = f"{len(texts)} given texts"
    ids = encode_texts(tokenizer, texts, max_tokens)
    reference = reference_logits(peft_model, ids) if verify else []
    adapter_effect = 0.0
    if verify:
        with peft_model.disable_adapter():
            plain = reference_logits(peft_model, ids)
        adapter_effect = max(float((r - p).abs().max()) for r, p in zip(reference, plain, strict=True))
        del plain

    log("merging in float32")
    merged = peft_model.merge_and_unload(safe_merge=True)  # safe_merge: refuse NaN/inf before writing
    merged = merged.to(DTYPES[dtype])
    bad = [name for name, p in merged.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise ExportError(f"merged weight {bad[0]} is not finite in {dtype} (out of range); export float32")
    meta = _export_card_metadata(info, base_path, dtype)
    tmp = make_temp_dir(out)
    writing = "model*.safetensors"  # what a failed write was writing, where its error does not say (safetensors)
    try:
        log(f"writing {dtype} safetensors (shards up to {max_shard_size}) and the tokenizer")
        merged.save_pretrained(str(tmp), max_shard_size=max_shard_size)
        if not (tmp / "generation_config.json").is_file():
            merged.generation_config.save_pretrained(str(tmp))
        writing = "the tokenizer files"
        tokenizer.save_pretrained(str(tmp))
        del merged, peft_model, model  # free the parent's copy before the verifier loads its own
        gc.collect()

        max_diff, scale, tol, tokens = float("nan"), 0.0, float("nan"), 0
        if verify:
            log(f"verifying with plain transformers in a subprocess ({origin}, up to {max_tokens} tokens each)")
            max_diff, scale, tol = _verify(tmp, out, dtype, texts, ids, reference, tokenizer, max_tokens)
            tokens = sum(len(seq) for seq in ids)
            if adapter_effect <= tol:
                log(f"note: the adapter moves logits by at most {adapter_effect:.3g}, within the {dtype} tolerance "
                    f"{tol:.3g}; this check cannot tell a merged adapter from a missing one (float32 can)")
            meta["qlora_orpo"]["export"].update(
                {"max_abs_diff": max_diff, "tolerance": tol, "adapter_effect": adapter_effect,
                 "verified_on": origin}
            )
        writing = CARD_FILE
        atomic_write_text(tmp / CARD_FILE, _render_export_card(meta))
        shards = sorted(tmp.glob("model*.safetensors"))
        size = sum(p.stat().st_size for p in shards)
        writing = "the directory (reading it back, or renaming it into place)"
        if not verify:  # the verifier has read every shard; without it, at least their headers and lengths
            check_written_safetensors(tmp, full=False)
        replace_dir(tmp, out)
    except (OSError, SafetensorError) as exc:  # a full disk: safetensors raises its own error type
        kept = "the earlier export there is kept" if out.is_dir() and any(out.iterdir()) else "none was there before"
        message = write_failure(out, exc, kept, writing)
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(message) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result = ExportResult(
        out_dir=str(out), dtype=dtype, max_abs_diff=max_diff, tolerance=tol, adapter_effect=adapter_effect,
        logit_scale=scale, tokens_compared=tokens, shards=len(shards), bytes=size,
        seconds=time.perf_counter() - start,
    )
    verdict = (f"max |merged - adapter| logit difference {max_diff:.3g} <= tolerance {tol:.3g}"
               if verify else "not verified")
    log(f"wrote {out} ({len(shards)} shard(s), {size / 1e6:.1f} MB {dtype}); {verdict}; {result.seconds:.1f} s")
    return result


def _verify(
    tmp: Path,
    out: Path,
    dtype: str,
    texts: list[str],
    ids: list[list[int]],
    reference: list[torch.Tensor],
    tokenizer: PreTrainedTokenizerBase,
    max_tokens: int,
) -> tuple[float, float, float]:
    """Compare the written directory ``tmp`` with the reference logits; ``(max_abs_diff, logit_scale, tolerance)``."""
    scale = max(float(r.abs().max()) for r in reference)
    tol = tolerance(dtype, scale)
    logits, report = verify_with_transformers(tmp, texts, ids, max_tokens)
    check_report(report, tokenizer, out)
    max_diff = max(float((a - b).abs().max()) for a, b in zip(logits, reference, strict=True))
    if not max_diff <= tol:  # also catches NaN
        raise ExportVerificationError(
            f"{out}: merged logits differ from base + adapter by up to {max_diff:.3g}, above the "
            f"{dtype} tolerance {tol:.3g} (max |logit| {scale:.3g}); nothing was written"
        )
    return max_diff, scale, tol


def _check_output_dir(out: Path) -> None:
    """``out`` must be absent, empty, or an earlier export (which will be replaced)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"{out}: exists and is not a directory")
    if not any(out.iterdir()):
        return
    try:
        meta = parse_card((out / CARD_FILE).read_text(encoding="utf-8"), out / CARD_FILE)
        if "export" in meta["qlora_orpo"]:
            return
    except (OSError, UnicodeDecodeError, UserError):
        pass
    raise ExportError(f"{out}: exists and is not an earlier export; choose another --out or remove it")


def _export_card_metadata(info: AdapterInfo, base_path: str, dtype: str) -> dict[str, Any]:
    adapter_meta = info.card or {"qlora_orpo": {"base": {}}}
    ours = dict(adapter_meta["qlora_orpo"])
    ours["export"] = {"adapter": str(info.path.resolve()), "base_path": base_path, "dtype": dtype}
    meta = {k: v for k, v in adapter_meta.items() if k != "qlora_orpo"}
    meta["tags"] = sorted({*meta.get("tags", []), "merged"} - {"lora"})
    meta.pop("library_name", None)  # the merged model is a plain transformers model, not a peft adapter
    if meta.get("base_model"):
        meta["base_model_relation"] = "finetune"
    meta["library_name"] = "transformers"
    meta["qlora_orpo"] = ours
    return meta


def _render_export_card(meta: dict[str, Any]) -> str:
    import yaml

    export = meta["qlora_orpo"]["export"]
    from .card import METHOD_NAMES

    name = meta["qlora_orpo"]["base"].get("name") or export["base_path"]
    method = METHOD_NAMES.get((meta["qlora_orpo"].get("adapter") or {}).get("method", "lora"), "LoRA")
    lines = [
        "---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
        f"# {name} + ORPO {method} adapter, merged ({export['dtype']})", "",
        f"The adapter {export['adapter']} merged into {export['base_path']} in float32, stored as "
        f"{export['dtype']}. A plain transformers model: `AutoModelForCausalLM.from_pretrained(<this directory>)`.",
    ]
    if "max_abs_diff" in export:
        lines += ["", f"Verified with plain transformers on {export['verified_on']}: the largest logit difference "
                      f"from base + adapter (unmerged) is {export['max_abs_diff']:.3g} "
                      f"(tolerance {export['tolerance']:.3g})."]
    return "\n".join(lines) + "\n"
