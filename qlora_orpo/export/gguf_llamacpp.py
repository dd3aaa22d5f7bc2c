"""llama.cpp as the judge of a GGUF export: the file run by the runtime its users have.

transformers' GGUF reader is not llama.cpp: it ignores ``tokenizer.ggml.pre`` (so a name
llama.cpp refuses passed), rebuilds the tokenizer its own way and computes in PyTorch. When
``llama-cpp-python`` is installed (``pip install qlora_orpo[gguf]``) the export is judged by
llama.cpp itself instead, in a ``python -I`` subprocess that never imports ``qlora_orpo`` (a
llama.cpp crash or abort cannot take the export down with it):

* the file must load (llama.cpp's own error lines are the message when it does not), and
  everything llama.cpp warns about while loading it is recorded in the check;
* llama.cpp's tokenizer must give the transformers tokenizer's ids on the mixed text and on
  each verification conversation (special tokens parsed, none added);
* **BOS exactly once**: each conversation, rendered by the chat template, is tokenised as
  llama.cpp's chat front ends do (a leading BOS text cut when the file says ``add_bos_token``,
  then the model's special tokens added) and must equal the ids training saw;
* the chat template in the file must be the tokenizer's;
* logits (``logits_all``) on the verification ids must stay within
  :func:`~qlora_orpo.export.gguf_verify.gguf_tolerance` of the float32 merged model, and
  greedy continuations of their first halves are compared token for token.

Without ``llama_cpp`` the transformers read-back (:mod:`qlora_orpo.export.gguf_verify`) judges,
and :attr:`GGUFCheck.judge` says which one did.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .gguf_verify import Q8_0_EPS, Q8_0_FACTOR, GGUFCheck, compare_read_back, gguf_tolerance, score_outputs
from .merged import log
from .verify import EPS, ROUNDING_FACTOR, ExportVerificationError

if TYPE_CHECKING:
    from .gguf_vocab import Vocab

TRANSFORMERS_JUDGE = "transformers"


def llama_cpp_available() -> bool:
    """Whether ``llama_cpp`` can be imported here, found without importing it (that loads llama.cpp's libraries)."""
    return importlib.util.find_spec("llama_cpp") is not None


# Runs in `python -I`: numpy and llama_cpp only. Writes report.json (also when the load fails)
# and logits_<i>.npy. The KV cache is float32 so that an f32 file is judged on its own numbers,
# not on the runtime's default float16 cache.
LLAMACPP_SCRIPT = r"""
import ctypes, json, os, sys
from pathlib import Path
import numpy as np
import llama_cpp

path, io_dir = sys.argv[1], Path(sys.argv[2])
spec = json.loads((io_dir / "inputs.json").read_text())
report = {"version": llama_cpp.__version__, "warnings": [], "errors": [], "loaded": False}
WARN, ERROR, CONT = 3, 4, 5  # ggml_log_level
last = [0]

@llama_cpp.llama_log_callback
def on_log(level, text, user_data):
    message = text.decode("utf-8", "replace")
    level = last[0] if level == CONT else level
    last[0] = level
    if level in (WARN, ERROR) and message.strip():
        report["warnings" if level == WARN else "errors"].append(message.rstrip())

llama_cpp.llama_log_set(on_log, ctypes.c_void_p(0))

def save():
    report["qlora_orpo_imported"] = any(m == "qlora_orpo" or m.startswith("qlora_orpo.") for m in sys.modules)
    (io_dir / "report.json").write_text(json.dumps(report))

longest = max([len(ids) for ids in spec["ids"]] + [len(p) + spec["greedy_tokens"] for p in spec["greedy_prompts"]])
n_ctx = max(64, longest + 8)
try:
    llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                          n_threads=spec["threads"], n_threads_batch=spec["threads"], type_k=0, type_v=0,
                          flash_attn=False, verbose=True, seed=0)
except Exception as exc:
    report["errors"].append(f"{type(exc).__name__}: {exc}")
    save()
    sys.exit(0)
report["loaded"] = True
report["n_vocab"] = llm.n_vocab()
report["chat_template"] = llm.metadata.get("tokenizer.chat_template")
report["add_bos"] = bool(llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(llm.model)))

def tokenize(text, add_special):
    return llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=True)

report["arch"] = llm.metadata.get("general.architecture")
report["token_mismatch"] = None
for i, (text, ids) in enumerate(zip(spec["check_texts"], spec["check_ids"])):
    if spec["after_bos"]:
        text, ids = spec["bos_text"] + text, spec["check_ids_after_bos"][i]
    mine = tokenize(text, False)
    if mine != ids:
        at = next((k for k, (a, b) in enumerate(zip(mine, ids)) if a != b), min(len(mine), len(ids)))
        report["token_mismatch"] = [i, at, mine[at:at + 5], ids[at:at + 5]]
        break
report["runtime_ids"] = []
bos = spec["bos_text"]
for text in spec["conversations"]:
    if report["add_bos"] and bos and text.startswith(bos):
        text = text[len(bos):]
    report["runtime_ids"].append(tokenize(text, True))
for i, ids in enumerate(spec["ids"]):
    llm.reset()
    llm.eval(ids)
    np.save(io_dir / f"logits_{i}.npy", np.array(llm.scores[: len(ids)], dtype=np.float32), allow_pickle=False)
report["greedy"] = []
for prompt in spec["greedy_prompts"]:
    llm.reset()
    llm.eval(prompt)
    out = []
    while len(out) < spec["greedy_tokens"]:
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        if token in spec["stop_ids"] or len(out) == spec["greedy_tokens"]:
            break
        llm.eval([token])
    report["greedy"].append(out)
save()
"""


def run_llamacpp(path: Path, spec: dict[str, Any]) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """Run :data:`LLAMACPP_SCRIPT` on ``path`` in ``python -I``; its logits ``(seq, vocab)`` and its report."""
    with tempfile.TemporaryDirectory(prefix="qlora_orpo-gguf-llamacpp-") as io:
        io_dir = Path(io)
        (io_dir / "inputs.json").write_text(json.dumps(spec))
        proc = subprocess.run([sys.executable, "-I", "-c", LLAMACPP_SCRIPT, str(path), str(io_dir)],
                              capture_output=True, text=True, errors="replace")
        report_file = io_dir / "report.json"
        if proc.returncode != 0 or not report_file.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise ExportVerificationError(f"{path}: llama.cpp crashed on the GGUF (exit {proc.returncode}): "
                                          f"{' | '.join(tail)}")
        report = json.loads(report_file.read_text())
        logits = [torch.from_numpy(np.load(io_dir / f"logits_{i}.npy", allow_pickle=False))
                  for i in range(len(spec["ids"])) if report.get("loaded")]
    return logits, report


def llamacpp_spec(reference: dict[str, Any], vocab: Vocab) -> dict[str, Any]:
    """The subprocess's inputs: the read-back's (``reference["spec"]``) plus the conversations and BOS."""
    spec = dict(reference["spec"])
    bos_id = vocab.special_ids.get("bos")
    spec["conversations"] = spec["check_texts"][1:]  # the first is the mixed text, the rest rendered conversations
    spec["bos_text"] = vocab.tokens[bos_id] if bos_id is not None else None
    spec["threads"] = max(1, int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1))
    # A SentencePiece vocabulary of transformers' "first" scheme puts a ▁ before the text at offset 0
    # only, which no llama.cpp setting reproduces (gguf_spm.space_handling); llama.cpp always adds
    # BOS to such a model, so it never meets text at offset 0: compare each text after a BOS.
    spec["after_bos"] = getattr(vocab, "space_scheme", None) == "first" and "check_ids_after_bos" in spec
    return spec


# ggml's CPU GELU reads a float16 table (GGML_GELU_FP16): the MLP activations of these
# architectures are rounded to float16 whatever the file's type.
GELU_ARCHS = frozenset({"gemma", "gemma2", "gemma3"})


def llamacpp_tolerance(quant: str, logit_scale: float, arch: str | None) -> float:
    """:func:`gguf_tolerance` (the file's own rounding) plus the rounding of llama.cpp's CPU arithmetic.

    A matrix product in ggml converts the activations to the weight's ``vec_dot_type`` first:
    float16 for F16 weights, 8-bit blocks (Q8_0, Q8_K) for every quantised type. That is a second
    perturbation of the same relative size as the weights' own, so the file's term is added once
    more (f16: ``8 * eps16``; quantised: ``16 / 127`` per :func:`gguf_tolerance`), and an f16 term
    for the float16 GELU table of :data:`GELU_ARCHS`. Measured on the tiny families (max|logit| 1
    to 3): Llama/Qwen2/Phi-3 f32 within 2e-6 (float32 KV cache), Gemma-2/3 f32 2e-3 (GELU),
    q8_0 up to 17.5 ``max|logit| / 127`` against 16 for the transformers read-back.
    """
    scale = max(1.0, float(logit_scale))
    bound = gguf_tolerance(quant, logit_scale)
    if quant == "f16":
        bound += ROUNDING_FACTOR * EPS["float16"] * scale
    elif quant != "f32":
        bound += Q8_0_FACTOR * Q8_0_EPS * scale
    if arch in GELU_ARCHS:
        bound += ROUNDING_FACTOR * EPS["float16"] * scale
    return bound


def judge_with_llamacpp(path: Path, out: Path, quant: str, reference: dict[str, Any],
                        base_logits: list[torch.Tensor], vocab: Vocab) -> GGUFCheck:
    """Load ``path`` in llama.cpp and compare it with ``reference``; :class:`ExportVerificationError` on any failure."""
    spec = llamacpp_spec(reference, vocab)
    logits, report = run_llamacpp(path, spec)
    judge = f"llama.cpp (llama-cpp-python {report.get('version')})"
    if report.get("qlora_orpo_imported"):
        raise ExportVerificationError(f"{out}: the llama.cpp judge imported qlora_orpo")
    if not report.get("loaded"):
        errors = [e.strip() for e in report.get("errors") or []][-3:]
        raise ExportVerificationError(f"{out}: {judge} cannot load the GGUF: {' | '.join(errors) or 'no reason given'}")
    # One line each; the banner lines of a warning ("load: ****") say nothing on their own.
    warnings = [" ".join(w.split()) for w in report.get("warnings") or []
                if any(c.isalpha() for c in w.split(":", 1)[-1])]
    try:
        if report.get("token_mismatch") is not None:
            text, at, theirs, ours = report["token_mismatch"]
            raise ExportVerificationError(f"{out}: llama.cpp tokenises verification text {text} differently at "
                                          f"token {at} ({theirs} instead of {ours})")
        _check_bos(report, spec, out, spec["bos_text"], vocab.special_ids.get("bos"))
        if vocab.chat_template and report.get("chat_template") != vocab.chat_template:
            raise ExportVerificationError(f"{out}: llama.cpp reads another chat template from the GGUF")
        if report.get("n_vocab") != len(vocab.tokens):
            raise ExportVerificationError(f"{out}: llama.cpp sees {report.get('n_vocab')} tokens, the model has "
                                          f"{len(vocab.tokens)}")
        check = score_outputs(logits, report["greedy"], reference, base_logits, quant, out, judge,
                              lambda q, scale: llamacpp_tolerance(q, scale, report.get("arch")))
    except ExportVerificationError as exc:
        if not warnings:
            raise
        # What llama.cpp warned about while loading the file is usually why it then disagrees.
        raise ExportVerificationError(f"{exc} (llama.cpp warned: {' | '.join(warnings[:3])})") from exc
    check.warnings = warnings
    return check


def _leading(ids: list[int], token: int | None) -> int:
    """How many times ``token`` opens ``ids``."""
    return next((k for k, t in enumerate(ids) if t != token), len(ids)) if token is not None else 0


def _check_bos(report: dict[str, Any], spec: dict[str, Any], out: Path, bos_text: str | None, bos_id: int | None) -> None:
    """Each conversation as llama.cpp's chat front ends feed it must be the ids training saw: BOS once, or never."""
    for i, (runtime, trained) in enumerate(zip(report["runtime_ids"], spec["check_ids"][1:], strict=True)):
        if runtime == trained:
            continue
        if _leading(runtime, bos_id) != _leading(trained, bos_id):
            raise ExportVerificationError(
                f"{out}: llama.cpp would start conversation {i} with {_leading(runtime, bos_id)} BOS token(s) "
                f"({bos_text!r}), training saw {_leading(trained, bos_id)}; add_bos_token={report.get('add_bos')}")
        at = next((k for k, (a, b) in enumerate(zip(runtime, trained, strict=False)) if a != b),
                  min(len(runtime), len(trained)))
        raise ExportVerificationError(f"{out}: llama.cpp tokenises conversation {i} with its special tokens "
                                      f"differently at token {at} ({runtime[at:at + 5]} instead of {trained[at:at + 5]})")


def judge_gguf(path: Path, out: Path, quant: str, reference: dict[str, Any], base_logits: list[torch.Tensor],
               vocab: Vocab) -> GGUFCheck:
    """Verify the written ``path`` (to be published as ``out``) with llama.cpp when installed, else with transformers."""
    texts = len(reference["spec"]["ids"])
    if llama_cpp_available():
        log(f"verifying in llama.cpp (llama-cpp-python) in a subprocess ({texts} texts)")
        check = judge_with_llamacpp(path, out, quant, reference, base_logits, vocab)
        for warning in check.warnings:
            log(f"llama.cpp warns: {warning}")
        return check
    log(f"verifying with plain transformers (gguf_file=) in a subprocess ({texts} texts); "
        "pip install 'qlora_orpo[gguf]' to have llama.cpp itself judge the file")
    return compare_read_back(path, out, quant, reference, base_logits, vocab.chat_template)
