"""Verification of a GGUF export by plain transformers, and the tolerance per quant type.

The merged float32 model gives the reference: logits on the verification texts, greedy
continuations of their first halves, and token ids of a mixed text. A ``python -I`` subprocess
that never imports ``qlora_orpo`` (and checks that it did not) reads the GGUF with
transformers (``gguf_file=``, which dequantises every tensor and undoes the q/k permutation),
tokenises the same texts and computes the same outputs. Any token difference, a lost chat
template, a changed tie of the embeddings, or a logit difference above :func:`gguf_tolerance`
fails the export.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..config import GGUF_QUANTS
from .verify import EPS, ROUNDING_FACTOR, ExportError, ExportVerificationError, reference_logits, tolerance

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

QUANTS = GGUF_QUANTS
Q8_0_EPS = 1.0 / 127  # one Q8_0 step relative to the largest |weight| of its block of 32
Q8_0_FACTOR = 16.0
# The mixes: one code step of the mix's default type relative to the largest |weight| its block
# spans (Q6_K: 64 levels over [-max, max]; Q5_K/Q4_K: 31/15 steps over [min, max], up to 2 max;
# Q5_0/Q4_0: 32/16 levels over [-max, max]), and the allowed multiple of it: twice the largest
# multiple measured (gguf_tolerance's docstring).
MIX_STEP = {"q6_k": 1 / 32, "q5_k_m": 2 / 31, "q4_k_m": 2 / 15, "q5_0": 1 / 16, "q4_0": 1 / 8}
MIX_FACTOR = {"q6_k": 13.0, "q5_k_m": 24.0, "q4_k_m": 8.0, "q5_0": 16.0, "q4_0": 10.0}
GREEDY_TOKENS = 24


@dataclass
class GGUFCheck:
    max_abs_diff: float  # GGUF read back by transformers vs the merged float32 model, over all compared logits
    tolerance: float
    logit_scale: float  # max |reference logit|
    top1_agreement: float  # share of compared positions whose argmax token agrees
    greedy_identical: int  # greedy continuations identical token for token ...
    greedy_runs: int  # ... out of this many (one per verification text, from its first half)
    greedy_prefix: float  # mean share of each continuation generated before the first difference
    adapter_effect: float  # max |merged - base| logit difference, to judge what the check can see
    tokens_compared: int
    judge: str = "transformers"  # who ran the file: "transformers" (read-back) or "llama.cpp <version>"
    warnings: list[str] = field(default_factory=list)  # what the judge warned about while loading the file


def gguf_tolerance(quant: str, logit_scale: float) -> float:
    """Largest accepted |GGUF - merged float32| logit difference for matrices stored as ``quant``.

    * ``f32``: the tensors are the merged weights bit for bit (the q/k permutation moves rows,
      it does not round), so only float32 summation order could differ:
      :func:`qlora_orpo.export.verify.tolerance` for float32 (``64 * eps32 * max|logit|``). Measured
      exactly 0 on SmolLM2-135M with the shipped adapter and on the tiny test models.
    * ``f16``: every matrix is rounded once to float16, the perturbation the merged export's
      float16 tolerance covers (``8 * eps16 * max|logit|``, argued there): 0.38 at
      max|logit| = 48. Measured 0.059 on SmolLM2 + shipped adapter (1.3 ``eps16 * max|logit|``).
    * ``q8_0``: each block of 32 weights stores a float16 scale ``d = max|w| / 127`` and
      integer codes, so a weight moves by up to ``d / 2``: a step of ``1/127`` relative to its
      block's largest weight plays the role eps plays above (the scale's own float16 rounding
      is negligible next to it). The largest weight of a block sets the step for all 32, so
      the typical weight sees a larger relative error than float rounding would give it, and
      the measured multiple is larger: 3.4 ``max|logit| / 127`` on SmolLM2 + shipped adapter
      (1.29 absolute, argmax agreement 0.976), 7.7-8.7 on the 64-wide random test models
      (6 once their max|logit| below 1 is counted as 1, as the bound does). Allowed: :data:`Q8_0_FACTOR` = 16, i.e. 6.1 at max|logit| = 48.
      That is loose enough to let a weak adapter's effect hide (the export then logs a note,
      as the merged export does for bfloat16); a wrong permutation, a missing tensor or a
      mis-tied embedding still moves logits by far more.
    * The mixes (``q6_k``, ``q5_k_m``, ``q4_k_m``, ``q5_0``, ``q4_0``): as ``q8_0``, with the step of the
      mix's default type (:data:`MIX_STEP`) and a multiple (:data:`MIX_FACTOR`) twice the largest
      measured. Measured max difference / (step * max(1, max|logit|)), on the 64-wide random Llama
      and Qwen2 (where rows of 64 send the K-quants to their Q5_0/Q5_1/Q8_0 fallbacks), two 8-layer
      256-wide random Llamas (untied, then tied; real K-quants) and SmolLM2-135M + shipped adapter:
      q6_k 1.5, 1.9, 2.3, 6.3, 1.4; q5_k_m 4.6, 4.0, 1.9, 3.0, 2.3; q4_k_m 3.7, 2.1, 2.1, 3.5,
      0.9; q5_0 7.8, 4.4, 2.8, 3.9, 2.2; q4_0 4.9, 3.9, 3.0, 4.4, 2.1. Judged by llama.cpp, the
      tiny SentencePiece Llama-2 of ``scripts/gguf_family_table.py`` measured q5_k_m 12.0 (its
      Q5_1 fallbacks, beyond llama.cpp's own activation rounding), so q5_k_m allows 24. The bounds come to
      0.41 (q6_k), 1.55 (q5_k_m), 1.07 (q4_k_m), 1.0 (q5_0) and 1.25 (q4_0) times max|logit| (on
      SmolLM2, max|logit| 47.4: measured 2.0, 7.2, 5.8, 6.5, 12.6 against 19.3, 30.6, 50.6, 47.4,
      59.3). At 4 and 5 bits the random test models' near-flat logits move by half their scale, so
      this check only catches breakage that moves logits by more than their own size (a missing or
      mis-permuted tensor on a real model) and cannot see a missing adapter (the export logs the
      note); top-1 agreement and greedy runs are reported beside it.
    """
    if quant not in QUANTS:
        raise ExportError(f"quant: {quant!r} is not one of {', '.join(QUANTS)}")
    scale = max(1.0, float(logit_scale))
    bound = tolerance("float32", scale)
    if quant == "f16":
        bound += ROUNDING_FACTOR * EPS["float16"] * scale
    elif quant == "q8_0":
        bound += Q8_0_FACTOR * Q8_0_EPS * scale
    elif quant in MIX_STEP:
        bound += MIX_FACTOR[quant] * MIX_STEP[quant] * scale
    return bound



def mixed_text(tokenizer: PreTrainedTokenizerBase, end_of_turn: str | None) -> str:
    """A text that exercises the pre-tokenizer: runs of spaces, tabs, newlines, digits, accents, CJK, specials."""
    specials = " ".join(dict.fromkeys(t for t in (tokenizer.bos_token, tokenizer.eos_token, end_of_turn) if t))
    return ("Hello  world!\tTabs\t\tand    spaces\n\n  indented\r\n12345 3.14159 2024-06-01 x42y "
            "café naïve Ærøskøbing façade Ünïcödé — “quotes” 'it's' "
            "你好，世界。日本語のテキスト 한국어 🙂👍 "
            f"{specials}<|not_special|> end")


VERIFY_SCRIPT = r"""
import json, sys
from pathlib import Path
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

path, io_dir = Path(sys.argv[1]), Path(sys.argv[2])
spec = json.loads((io_dir / "inputs.json").read_text())
tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
report = {"token_mismatch": None, "chat_template": tokenizer.chat_template,
          "tie_word_embeddings": bool(model.config.tie_word_embeddings), "greedy": []}
for i, (text, ids) in enumerate(zip(spec["check_texts"], spec["check_ids"])):
    mine = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if mine != ids and report["token_mismatch"] is None:
        at = next((k for k, (a, b) in enumerate(zip(mine, ids)) if a != b), min(len(mine), len(ids)))
        report["token_mismatch"] = [i, at, mine[at:at + 5], ids[at:at + 5]]
logits = {}
with torch.no_grad():
    for i, ids in enumerate(spec["ids"]):
        logits[f"logits_{i}"] = model(torch.tensor([ids])).logits[0].float().contiguous()
    for prompt in spec["greedy_prompts"]:
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=spec["greedy_tokens"], do_sample=False, pad_token_id=0)
        report["greedy"].append(out[0, len(prompt):].tolist())
save_file(logits, str(io_dir / "logits.safetensors"))
report["qlora_orpo_imported"] = any(m == "qlora_orpo" or m.startswith("qlora_orpo.") for m in sys.modules)
(io_dir / "report.json").write_text(json.dumps(report))
"""


def read_back(path: Path, spec: dict[str, Any]) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """Run :data:`VERIFY_SCRIPT` on ``path`` in ``python -I``; its logits and its report."""
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(prefix="qlora_orpo-gguf-verify-") as io:
        io_dir = Path(io)
        (io_dir / "inputs.json").write_text(json.dumps(spec))
        proc = subprocess.run([sys.executable, "-I", "-c", VERIFY_SCRIPT, str(path), str(io_dir)],
                              capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise ExportVerificationError(f"{path}: plain transformers cannot read the GGUF: {' | '.join(tail)}")
        report = json.loads((io_dir / "report.json").read_text())
        tensors = load_file(str(io_dir / "logits.safetensors"))
    return [tensors[f"logits_{i}"] for i in range(len(spec["ids"]))], report


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


@torch.no_grad()
def _greedy(model: PreTrainedModel, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    out = []
    for prompt in prompts:
        ids = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=tokens, do_sample=False, pad_token_id=0)
        out.append(ids[0, len(prompt):].tolist())
    return out



def _stop_ids(model: PreTrainedModel) -> list[int]:
    """The ids ``generate`` stops at (generation config's EOS), for a judge that runs its own greedy loop."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = eos if eos is not None else model.config.eos_token_id
    return [int(t) for t in (eos if isinstance(eos, list) else [eos]) if t is not None]


def reference_outputs(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str],
                      ids: list[list[int]], end_of_turn: str | None, greedy_tokens: int) -> dict[str, Any]:
    """What the read-back must reproduce: the subprocess's inputs (``spec``) and the merged model's outputs."""
    prompts = [seq[: max(1, len(seq) // 2)] for seq in ids]
    check = [mixed_text(tokenizer, end_of_turn), *texts]
    spec = {"check_texts": check, "check_ids": [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in check],
            "ids": ids, "greedy_prompts": prompts, "greedy_tokens": greedy_tokens,
            "stop_ids": _stop_ids(model)}
    if tokenizer.bos_token:  # each text after a BOS, as a runtime that always adds one sees it (gguf_llamacpp)
        spec["check_ids_after_bos"] = [list(tokenizer(tokenizer.bos_token + t, add_special_tokens=False)["input_ids"])
                                       for t in check]
    tied = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    return {"spec": spec, "logits": reference_logits(model, ids), "greedy": _greedy(model, prompts, greedy_tokens), "tied": tied}


def compare_read_back(path: Path, out: Path, quant: str, reference: dict[str, Any], base_logits: list[torch.Tensor],
                      chat_template: str | None) -> GGUFCheck:
    """Read ``path`` back in a subprocess and compare with ``reference``; :class:`ExportVerificationError` on failure."""
    logits, report = read_back(path, reference["spec"])
    _check_report(report, out, chat_template, reference["tied"])
    return score_outputs(logits, report["greedy"], reference, base_logits, quant, out, "transformers")


def score_outputs(logits: list[torch.Tensor], greedy: list[list[int]], reference: dict[str, Any],
                  base_logits: list[torch.Tensor], quant: str, out: Path, judge: str,
                  tolerance_of: Callable[[str, float], float] = gguf_tolerance) -> GGUFCheck:
    """A judge's logits ``(seq, vocab)`` and greedy continuations against ``reference``; raises above tolerance.

    ``tolerance_of(quant, max|reference logit|)``: the file's rounding (:func:`gguf_tolerance`)
    plus whatever the judge's own arithmetic adds.
    """
    ref = reference["logits"]
    scale = max(float(r.abs().max()) for r in ref)
    tol = tolerance_of(quant, scale)
    max_diff = max(float((a - b).abs().max()) for a, b in zip(logits, ref, strict=True))
    if not max_diff <= tol:  # also catches NaN
        raise ExportVerificationError(
            f"{out}: GGUF logits ({judge}) differ from the merged model by up to {max_diff:.3g}, above the "
            f"{quant} tolerance {tol:.3g} (max |logit| {scale:.3g}); nothing was written")
    compared = sum(len(r) for r in ref)
    agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(logits, ref, strict=True))
    pairs = list(zip(greedy, reference["greedy"], strict=True))
    return GGUFCheck(
        max_abs_diff=max_diff, tolerance=tol, logit_scale=scale, top1_agreement=agree / compared,
        greedy_identical=sum(a == b for a, b in pairs), greedy_runs=len(pairs),
        greedy_prefix=sum(_common_prefix(a, b) / max(1, len(b)) for a, b in pairs) / max(1, len(pairs)),
        adapter_effect=max(float((r - b).abs().max()) for r, b in zip(ref, base_logits, strict=True)),
        tokens_compared=compared, judge=judge,
    )


def _check_report(report: dict[str, Any], out: Path, chat_template: str | None, tied: bool) -> None:
    if report.get("qlora_orpo_imported"):
        raise ExportVerificationError(f"{out}: the verifier imported qlora_orpo, so it did not test plain transformers")
    if report.get("token_mismatch") is not None:
        text, at, theirs, ours = report["token_mismatch"]
        raise ExportVerificationError(
            f"{out}: the GGUF tokenizer encodes verification text {text} differently at token {at} "
            f"({theirs} instead of {ours})")
    if chat_template and report.get("chat_template") != chat_template:
        raise ExportVerificationError(f"{out}: the GGUF lost the chat template")
    if report.get("tie_word_embeddings") != tied:
        raise ExportVerificationError(f"{out}: transformers reads tie_word_embeddings={report.get('tie_word_embeddings')}"
                                      f" from the GGUF, the model has {tied}")
