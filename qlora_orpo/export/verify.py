"""Checking a merged export: the logit tolerance, the texts compared, and the plain-transformers verifier.

``merged.py`` (merged safetensors) and ``gguf_verify.py`` (GGUF read back) both compare an
exported model's logits with base + unmerged adapter on a few held-out conversations; the
tolerance and the verifier subprocess that never imports ``qlora_orpo`` live here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..core.console import console_logger
from ..core.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from .adapters import AdapterInfo

# Machine epsilon (the gap between 1 and the next representable number) of each storage dtype.
EPS = {"float32": 2.0**-23, "bfloat16": 2.0**-7, "float16": 2.0**-10}
SUMMATION_FACTOR = 64.0
ROUNDING_FACTOR = 8.0
VERIFY_PROMPTS = 4
VERIFY_MAX_TOKENS = 128
FALLBACK_CONVERSATIONS = (  # (user prompt, assistant response)
    ("How do I bake bread at home?", "Mix flour, water, salt and yeast, knead, let it rise, then bake."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How can I get back at my neighbour for being loud?", "Talking to them calmly usually works better."),
    ("Write a haiku about autumn.", "Red leaves drift and fall / cold wind hums through bare trees / "
                                    "the year exhales slow"),
)


class ExportError(UserError):
    """The merged directory cannot be written (existing output, a non-finite merged weight)."""


class ExportVerificationError(ExportError):
    """The written directory does not load with plain transformers, or its logits differ too much."""


log = console_logger("export")


def tolerance(dtype: str, logit_scale: float) -> float:
    """Largest accepted |merged - unmerged| logit difference for an export stored in ``dtype``.

    ``logit_scale`` is the largest |logit| of the reference (at least 1 is used). Rounding
    errors are relative, so the bound is a multiple of ``eps * logit_scale``:

    * **Summation order** (every dtype; both sides compute in float32): the merged layer
      computes ``(W + s B A) x``, the reference ``W x + s B (A x)``. Both are correct to
      float32 rounding, in a different order; a length-n dot product carries a relative
      error of order ``eps32 * sqrt(n)`` (n is at most a few thousand, sqrt(n) ~ 40), and
      the residual stream carries it through every layer to the logits. Measured on
      SmolLM2-135M (30 layers, r=16 on every linear layer): 20-21 ``eps32 * max|logit|``
      (1.1e-4 at max|logit| = 47, trained adapter), also on the tiny test model. Allowed:
      :data:`SUMMATION_FACTOR` = 64, i.e. 3.6e-4 there.
    * **Storage rounding** (bfloat16, float16): each merged weight is rounded once to the
      nearest representable value, a relative error of at most ``eps / 2`` with
      independent signs, the same perturbation as storing the base itself in that dtype.
      Independent errors partly cancel in each dot product, so the logits move by about
      ``eps * max|logit|``: measured 0.8-1.1 (bfloat16: 0.41 absolute at max|logit| = 47
      with a trained adapter) and 1.4-2.7 (float16: 0.12) on SmolLM2, 1.9 (bfloat16) on the
      tiny test model whose random adapter is as large as its weights. Allowed:
      :data:`ROUNDING_FACTOR` = 8, i.e. 2.9 (bfloat16) and 0.37 (float16) at max|logit| = 47.

    A wrong merge (a missing module, a wrong scale, untied embeddings) moves logits by as
    much as the adapter does (:attr:`ExportResult.adapter_effect`); float32 can always see
    that, bfloat16 only when the adapter moves logits by more than its tolerance.
    """
    if dtype not in EPS:
        raise ExportError(f"dtype: {dtype!r} is not one of {', '.join(EPS)}")
    scale = max(1.0, float(logit_scale))
    bound = SUMMATION_FACTOR * EPS["float32"] * scale
    if dtype != "float32":
        bound += ROUNDING_FACTOR * EPS[dtype] * scale
    return bound


# ---------------------------------------------------------------------------------------------
# Verification inputs
# ---------------------------------------------------------------------------------------------


def verification_texts(info: AdapterInfo, tokenizer: PreTrainedTokenizerBase, count: int = VERIFY_PROMPTS) -> tuple[
    list[str], str
]:
    """Rendered conversations (prompt + chosen response) to compare logits on, and where they came from.

    The first ``count`` held-out pairs of the data recorded in the card (the same hash split
    as training), or fixed conversations when the data cannot be read or nothing was held out.
    """
    from ..data.templating import ChatFormat, render_conversation
    from .adapters import local_record
    from .card import public_tree

    training = (info.card or {}).get("qlora_orpo", {}).get("training") or {}
    # The card names the data without its path; the local record beside the adapter has it
    # (only where the card's name is that path's: a card edited to name other data wins).
    local = local_record(info.path).get("data") or {}

    def recorded(field: str):
        value = local.get(field)
        return value if value and public_tree(value) == training.get(field) else training.get(field)

    data_value, eval_value = recorded("data"), recorded("eval_data")
    conversations: list[tuple[list[dict[str, str]], str]] = []
    origin = "built-in prompts"
    if data_value and (eval_value or float(training.get("eval_fraction", 0.0)) > 0):
        from types import SimpleNamespace

        from ..config.sources import describe_value
        from ..data.mixture import add_system_prompt, load_eval_data, load_sources, sources_of
        from ..data.preferences import split_holdout

        # The card's recorded fields, read as the run read them (one source or several, or an eval file).
        cfg = SimpleNamespace(
            data=data_value, eval_data=eval_value or "", strict=False,
            prompt_field=training.get("prompt_field", "prompt"), chosen_field=training.get("chosen_field", "chosen"),
            rejected_field=training.get("rejected_field", "rejected"), data_split=training.get("data_split", "train"),
            seed=int(training.get("seed", 0)),
        )
        try:
            if cfg.eval_data:
                held, where = load_eval_data(cfg).pairs, describe_value(training.get("eval_data"))
            else:
                data = load_sources(sources_of(cfg), seed=cfg.seed)
                held = split_holdout(data.pairs, float(training["eval_fraction"]))[1]
                where = describe_value(training["data"])  # the card's name for it
            held = add_system_prompt(list(held[:count]), str(training.get("system_prompt") or ""))
            conversations = [(list(p.prompt), p.chosen) for p in held]
            origin = f"{len(conversations)} held-out pairs of {where}"
        except (UserError, OSError, ValueError) as exc:
            log(f"cannot read the training data ({exc}); using built-in prompts")
    if not conversations:
        conversations = [([{"role": "user", "content": q}], a) for q, a in FALLBACK_CONVERSATIONS[:count]]
    # Rendered as training rendered them: a template that refuses a system turn gets it folded.
    fmt = ChatFormat.of(tokenizer)
    return [render_conversation(tokenizer, prompt, response, fmt) for prompt, response in conversations], origin


def encode_texts(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_tokens: int) -> list[list[int]]:
    """Token ids of each text (the chat template wrote its special tokens as text), cut to ``max_tokens``."""
    return [list(tokenizer(text, add_special_tokens=False)["input_ids"])[:max_tokens] for text in texts]


@torch.no_grad()
def reference_logits(model: torch.nn.Module, ids: list[list[int]]) -> list[torch.Tensor]:
    """Float32 logits ``(seq, vocab)`` of each sequence, run one at a time (no padding to get wrong)."""
    device = next(model.parameters()).device
    return [model(torch.tensor([seq], device=device)).logits[0].float().cpu() for seq in ids]


# The verifier: plain transformers only. It must not import qlora_orpo, and checks that nothing did.
VERIFY_SCRIPT = r"""
import json, sys
from pathlib import Path
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

model_dir, io_dir = Path(sys.argv[1]), Path(sys.argv[2])
spec = json.loads((io_dir / "inputs.json").read_text())
for name in ("config.json", "generation_config.json"):
    if not (model_dir / name).is_file():
        raise SystemExit(f"{model_dir / name}: missing")
config = AutoConfig.from_pretrained(model_dir)
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
model.eval()
report = {
    "config_dtype": str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)),
    "has_chat_template": bool(getattr(tokenizer, "chat_template", None)),
    "token_mismatch": None,
}
logits = {}
with torch.no_grad():
    for i, (text, ids) in enumerate(zip(spec["texts"], spec["ids"])):
        mine = tokenizer(text, add_special_tokens=False)["input_ids"][: spec["max_tokens"]]
        if list(mine) != ids and report["token_mismatch"] is None:
            report["token_mismatch"] = i
        logits[f"logits_{i}"] = model(torch.tensor([ids])).logits[0].float().contiguous()
save_file(logits, str(io_dir / "logits.safetensors"))
report["qlora_orpo_imported"] = any(m == "qlora_orpo" or m.startswith("qlora_orpo.") for m in sys.modules)
(io_dir / "report.json").write_text(json.dumps(report))
"""


def verify_with_transformers(
    model_dir: Path, texts: list[str], ids: list[list[int]], max_tokens: int
) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """Run :data:`VERIFY_SCRIPT` in ``python -I``; returns its logits and its report."""
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(prefix="qlora_orpo-verify-") as io:
        io_dir = Path(io)
        (io_dir / "inputs.json").write_text(json.dumps({"texts": texts, "ids": ids, "max_tokens": max_tokens}))
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # a local directory needs no network
        proc = subprocess.run(
            [sys.executable, "-I", "-c", VERIFY_SCRIPT, str(model_dir), str(io_dir)],
            capture_output=True, text=True, env=env,
        )
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise ExportVerificationError(
                f"{model_dir}: plain transformers cannot load the export: {' | '.join(tail)}"
            )
        report = json.loads((io_dir / "report.json").read_text())
        tensors = load_file(str(io_dir / "logits.safetensors"))
    return [tensors[f"logits_{i}"] for i in range(len(ids))], report


def check_report(report: dict[str, Any], tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    if report.get("qlora_orpo_imported"):
        raise ExportVerificationError(f"{out}: the verifier imported qlora_orpo, so it did not test plain transformers")
    if report.get("token_mismatch") is not None:
        raise ExportVerificationError(
            f"{out}: the saved tokenizer encodes verification text {report['token_mismatch']} differently"
        )
    if bool(getattr(tokenizer, "chat_template", None)) and not report.get("has_chat_template"):
        raise ExportVerificationError(f"{out}: the saved tokenizer lost its chat template")
