"""GGUF export: base + adapter -> one ``.gguf`` file for llama.cpp, LM Studio and Ollama, verified.

:func:`export_gguf` merges the adapter into the float32 base exactly as
:func:`~qlora_orpo.export.export_merged` does, then writes the merged weights with the ``gguf``
package alone (no llama.cpp build): architecture metadata, the tokenizer
(:mod:`qlora_orpo.gguf_vocab`), and each tensor under its GGUF name. Supported: the Llama
family (``llama``, ``mistral``: SmolLM, Llama, Mistral with a byte-level BPE tokenizer) and
``qwen2``. For ``llama``, llama.cpp's rotary layout differs from transformers': the rows of
``q_proj`` and ``k_proj`` are permuted per head (the two rotary halves interleaved), as
llama.cpp's ``convert_hf_to_gguf.py`` does; Qwen2's llama.cpp graph uses the transformers
("neox") layout, so it is written unpermuted. Norms and biases are always F32; ``--quant``
applies to matrices (Q8_0 falls back to F16 for a row length that is not a multiple of 32,
as llama.cpp does). Tied embeddings are written once as ``token_embd`` with no ``output``
tensor, which is how llama.cpp and transformers recognise them.

An Ollama ``Modelfile`` is written beside the file: the template as plain text around each
message (when the chat template is that simple), the default system prompt, and the stop
tokens, including the chat template's end-of-turn token (not only EOS).

Verification, before the file is published: a ``python -I`` subprocess that never imports
``qlora_orpo`` loads the file with plain transformers (``gguf_file=``, which dequantises it),
checks that its tokenizer encodes a mixed text (spaces, tabs, digits, accents, CJK, the
special tokens) and the verification conversations to the same ids, and computes logits and
greedy continuations. The largest absolute logit difference from the merged float32 model
must stay within :func:`gguf_tolerance`; otherwise the export fails and nothing is left.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .adapters import load_adapter, read_adapter, resolve_base
from .export import (
    EPS,
    ROUNDING_FACTOR,
    VERIFY_MAX_TOKENS,
    ExportError,
    ExportVerificationError,
    _logits,
    encode_texts,
    log,
    tolerance,
    verification_texts,
)
from .gguf_vocab import MODELFILE_HEADER, build_vocab, render_modelfile, write_vocab

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

QUANTS = ("f32", "f16", "q8_0")
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7}  # gguf.LlamaFileType: ALL_F32, MOSTLY_F16, MOSTLY_Q8_0
SUPPORTED = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}  # transformers model_type -> GGUF arch
PERMUTE_QK = {"llama"}  # GGUF archs whose llama.cpp graph wants llama.cpp's rotary row order
Q8_0_EPS = 1.0 / 127  # one Q8_0 step relative to the largest |weight| of its block of 32
Q8_0_FACTOR = 16.0
GREEDY_TOKENS = 24
OURS_KEY = "qlora_orpo.adapter"  # marks a file as our export, so that a later export may replace it


@dataclass
class GGUFExportResult:
    path: str
    modelfile: str
    quant: str
    bytes: int
    seconds: float
    max_abs_diff: float  # GGUF read back by transformers vs the merged float32 model
    tolerance: float
    logit_scale: float
    top1_agreement: float  # share of compared positions whose argmax token agrees
    greedy_identical: int  # greedy continuations identical token for token ...
    greedy_runs: int  # ... out of this many (one per verification text, from its first half)
    greedy_prefix: float  # mean share of each continuation generated before the first difference
    adapter_effect: float  # max |merged - base| logit difference, to judge what the check can see
    tokens_compared: int
    end_of_turn: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def gguf_tolerance(quant: str, logit_scale: float) -> float:
    """Largest accepted |GGUF - merged float32| logit difference for matrices stored as ``quant``.

    * ``f32``: the tensors are the merged weights bit for bit (the q/k permutation moves rows,
      it does not round), so only float32 summation order could differ:
      :func:`qlora_orpo.export.tolerance` for float32 (``64 * eps32 * max|logit|``). Measured
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
      (1.29 absolute, argmax agreement 0.976), 6-9 on the 64-wide random test models whose
      logits are all small. Allowed: :data:`Q8_0_FACTOR` = 16, i.e. 6.1 at max|logit| = 48.
      That is loose enough to let a weak adapter's effect hide (the export then logs a note,
      as the merged export does for bfloat16); a wrong permutation, a missing tensor or a
      mis-tied embedding still moves logits by far more.
    """
    if quant not in QUANTS:
        raise ExportError(f"quant: {quant!r} is not one of {', '.join(QUANTS)}")
    scale = max(1.0, float(logit_scale))
    bound = tolerance("float32", scale)
    if quant == "f16":
        bound += ROUNDING_FACTOR * EPS["float16"] * scale
    elif quant == "q8_0":
        bound += Q8_0_FACTOR * Q8_0_EPS * scale
    return bound


# ---------------------------------------------------------------------------------------------
# Architecture and tensors
# ---------------------------------------------------------------------------------------------


def gguf_arch(config: Any, where: str) -> str:
    """The GGUF architecture of a transformers ``config``; a one-line error for anything unsupported."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        raise ExportError(f"{where}: architecture {model_type!r} cannot be exported to GGUF; "
                          f"supported: {', '.join(SUPPORTED)}")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in (None, "default"):
        raise ExportError(f"{where}: rope scaling {rope_type!r} is not supported by the GGUF export")
    if model_type != "qwen2" and (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)):
        raise ExportError(f"{where}: {model_type} with attention/mlp biases is not supported by the GGUF export")
    if model_type == "qwen2" and getattr(config, "use_sliding_window", False):
        raise ExportError(f"{where}: qwen2 with use_sliding_window is not supported by the GGUF export")
    return SUPPORTED[model_type]


def _rope_theta(config: Any) -> float:
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and "rope_theta" in rope:
        return float(rope["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))


def permute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q/k projection ``(n_head * head_dim, in)`` (or its bias) in llama.cpp's rotary order.

    transformers rotates the first half of each head against the second half; llama.cpp's
    ``llama`` graph rotates adjacent pairs. Interleave the halves: per head, row ``h*d + 2i + j``
    takes row ``h*d + j*d/2 + i``. transformers' GGUF reader applies the inverse.
    """
    head_dim = weight.shape[0] // n_head
    return weight.reshape(n_head, 2, head_dim // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_tensors(model: PreTrainedModel, arch: str) -> dict[str, torch.Tensor]:
    """Every weight of ``model`` under its GGUF name (``blk.N.attn_q.weight``...), q/k permuted where needed.

    Walks ``named_parameters(remove_duplicate=False)`` so that a tied output embedding is seen
    and skipped on purpose, never lost by a state dict that keeps only ``lm_head.weight``.
    """
    import gguf

    config = model.config
    arch_enum = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    names = gguf.get_tensor_name_map(arch_enum, config.num_hidden_layers)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    embedding, output = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    tied = output is embedding or output.data_ptr() == embedding.data_ptr()
    tensors: dict[str, torch.Tensor] = {"token_embd.weight": embedding.detach()}
    for name, param in model.named_parameters(remove_duplicate=False):
        if param is embedding or (param is output and tied):
            continue
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise ExportError(f"{name}: no GGUF tensor name for this {arch} weight")
        data = param.detach()
        if arch in PERMUTE_QK and ".attn_q." in target:
            data = permute_qk(data, heads)
        elif arch in PERMUTE_QK and ".attn_k." in target:
            data = permute_qk(data, kv_heads)
        if target in tensors:
            raise ExportError(f"{name}: GGUF name {target} is used twice")
        tensors[target] = data
    return tensors


def encode_tensor(name: str, tensor: torch.Tensor, quant: str) -> tuple[np.ndarray, Any]:
    """``(data, ggml type)`` of one tensor: 1-D in F32 (norms, biases), matrices in ``quant``."""
    import gguf

    array = tensor.float().cpu().numpy()
    F = gguf.GGMLQuantizationType
    if array.ndim == 1 or quant == "f32":
        return array, F.F32
    if quant == "q8_0" and array.shape[-1] % gguf.GGML_QUANT_SIZES[F.Q8_0][0] == 0:
        return gguf.quants.quantize(array, F.Q8_0), F.Q8_0
    half = array.astype(np.float16)
    if not np.isfinite(half).all():
        raise ExportError(f"{name}: a weight is out of float16 range; export with --quant f32")
    return half, F.F16


def write_gguf(path: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, arch: str, quant: str,
               name: str, adapter: str) -> Any:
    """Write ``model`` and ``tokenizer`` to ``path``; returns the :class:`~qlora_orpo.gguf_vocab.Vocab` written."""
    import gguf

    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    vocab = build_vocab(tokenizer, config.vocab_size)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type("model")
    writer.add_name(name)
    writer.add_string(OURS_KEY, adapter)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:  # llama.cpp assumes hidden / heads unless told
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(FILE_TYPES[quant])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_vocab(writer, vocab)
    for tensor_name, tensor in gguf_tensors(model, arch).items():
        data, qtype = encode_tensor(tensor_name, tensor, quant)
        writer.add_tensor(tensor_name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return vocab


# ---------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def export_gguf(
    adapter_dir: str | Path,
    out_path: str | Path,
    quant: str = "f16",
    *,
    base: str | None = None,
    force: bool = False,
    verify: bool = True,
    texts: list[str] | None = None,
    max_tokens: int = VERIFY_MAX_TOKENS,
    greedy_tokens: int = GREEDY_TOKENS,
) -> GGUFExportResult:
    """Merge the adapter into its base and write ``out_path`` (``.gguf``) and a ``Modelfile`` beside it.

    ``out_path`` not ending in ``.gguf`` is a directory that receives ``model-<quant>.gguf``.

    ``base``/``force``/``texts`` as in :func:`~qlora_orpo.export.export_merged`. The file is
    written to a temporary sibling and renamed once verified; an existing ``out_path`` is
    replaced only if it is an earlier export of ours, an existing ``Modelfile`` only if we wrote it.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    if quant not in QUANTS:
        raise ExportError(f"quant: {quant!r} is not one of {', '.join(QUANTS)}")
    out = Path(out_path)
    if out.suffix != ".gguf":  # a directory: the file gets a name that says what it holds
        if out.exists() and not out.is_dir():
            raise ExportError(f"{out}: exists and is not a directory; give a directory or a name ending in .gguf")
        out = out / f"model-{quant}.gguf"
    modelfile = out.parent / "Modelfile"
    _check_outputs(out, modelfile)
    info = read_adapter(adapter_dir, require_card=not force)
    base_path = resolve_base(info, base)
    try:
        arch = gguf_arch(AutoConfig.from_pretrained(base_path), f"base {base_path}")  # refuse before loading weights
        tokenizer = AutoTokenizer.from_pretrained(base_path)
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise ExportError(f"base {base_path}: cannot load ({str(exc).splitlines()[0]})") from exc
    log(f"base {base_path} (float32, CPU); adapter {info.path}; GGUF {arch} {quant}")
    peft_model = load_adapter(model, tokenizer, info.path, force=force).eval()
    if verify:
        if texts is None:
            texts, _ = verification_texts(info, tokenizer)
        ids = encode_texts(tokenizer, texts, max_tokens)
        with peft_model.disable_adapter():
            base_logits = _logits(peft_model, ids)
    merged = peft_model.merge_and_unload(safe_merge=True).eval()
    del peft_model
    name = f"{(info.card or {}).get('qlora_orpo', {}).get('base', {}).get('name') or Path(base_path).name} ORPO"

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        log(f"writing {out} ({quant}; norms and biases F32)")
        vocab = write_gguf(tmp, merged, tokenizer, arch, quant, name, str(info.path.resolve()))
        max_diff, scale, tol, top1, compared, effect = float("nan"), 0.0, float("nan"), float("nan"), 0, float("nan")
        same, prefix, prompts = 0, float("nan"), []
        if verify:
            reference = _logits(merged, ids)
            effect = max(float((r - b).abs().max()) for r, b in zip(reference, base_logits, strict=True))
            tied = merged.get_output_embeddings().weight.data_ptr() == merged.get_input_embeddings().weight.data_ptr()
            prompts = [seq[: max(1, len(seq) // 2)] for seq in ids]
            ours_greedy = _greedy(merged, prompts, greedy_tokens)
            check = [mixed_text(tokenizer, vocab.end_of_turn), *texts]
            spec = {"check_texts": check, "check_ids": [list(tokenizer(t, add_special_tokens=False)["input_ids"])
                                                        for t in check],
                    "ids": ids, "greedy_prompts": prompts, "greedy_tokens": greedy_tokens}
            del merged, model
            gc.collect()
            log(f"verifying with plain transformers (gguf_file=) in a subprocess ({len(ids)} texts)")
            logits, report = read_back(tmp, spec)
            _check_report(report, out, vocab, tied)
            scale = max(float(r.abs().max()) for r in reference)
            tol = gguf_tolerance(quant, scale)
            max_diff = max(float((a - b).abs().max()) for a, b in zip(logits, reference, strict=True))
            agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(logits, reference, strict=True))
            compared = sum(len(seq) for seq in ids)
            top1 = agree / compared
            pairs = list(zip(report["greedy"], ours_greedy, strict=True))
            same = sum(a == b for a, b in pairs)
            prefix = sum(_common_prefix(a, b) / max(1, len(b)) for a, b in pairs) / len(pairs)
            if not max_diff <= tol:  # also catches NaN
                raise ExportVerificationError(
                    f"{out}: GGUF logits differ from the merged model by up to {max_diff:.3g}, above the {quant} "
                    f"tolerance {tol:.3g} (max |logit| {scale:.3g}); nothing was written")
        size = tmp.stat().st_size
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    modelfile.write_text(render_modelfile(out.name, tokenizer, vocab.end_of_turn), encoding="utf-8")
    result = GGUFExportResult(
        path=str(out), modelfile=str(modelfile), quant=quant, bytes=size, seconds=time.perf_counter() - start,
        max_abs_diff=max_diff, tolerance=tol, logit_scale=scale, top1_agreement=top1, greedy_identical=same,
        greedy_runs=len(prompts), greedy_prefix=prefix, adapter_effect=effect, tokens_compared=compared,
        end_of_turn=vocab.end_of_turn,
    )
    verdict = (f"max |GGUF - merged| logit difference {max_diff:.3g} <= tolerance {tol:.3g}, top-1 agreement "
               f"{top1:.3f}, greedy identical {same}/{len(prompts)}" if verify else "not verified")
    if verify and effect <= tol:
        log(f"note: the adapter moves logits by at most {effect:.3g}, within the {quant} tolerance {tol:.3g}; "
            f"this check cannot tell a merged adapter from a missing one (f32 can)")
    log(f"wrote {out} ({size / 1e6:.1f} MB {quant}) and {modelfile}; {verdict}; {result.seconds:.1f} s")
    return result


def _check_outputs(out: Path, modelfile: Path) -> None:
    """``out`` must be absent or an earlier export; the Modelfile absent or ours."""
    if out.exists():
        try:
            import gguf

            ours = OURS_KEY in gguf.GGUFReader(str(out)).fields
        except Exception:  # noqa: BLE001 - any unreadable file is simply not ours
            ours = False
        if not ours:
            raise ExportError(f"{out}: exists and is not an earlier GGUF export; choose another --out or remove it")
    if modelfile.exists() and not modelfile.read_text(encoding="utf-8", errors="replace").startswith(MODELFILE_HEADER):
        raise ExportError(f"{modelfile}: exists and was not written by qlora_orpo; choose another directory")


def _check_report(report: dict[str, Any], out: Path, vocab: Any, tied: bool) -> None:
    if report.get("qlora_orpo_imported"):
        raise ExportVerificationError(f"{out}: the verifier imported qlora_orpo, so it did not test plain transformers")
    if report.get("token_mismatch") is not None:
        text, at, theirs, ours = report["token_mismatch"]
        raise ExportVerificationError(
            f"{out}: the GGUF tokenizer encodes verification text {text} differently at token {at} "
            f"({theirs} instead of {ours})")
    if vocab.chat_template and report.get("chat_template") != vocab.chat_template:
        raise ExportVerificationError(f"{out}: the GGUF lost the chat template")
    if report.get("tie_word_embeddings") != tied:
        raise ExportVerificationError(f"{out}: transformers reads tie_word_embeddings={report.get('tie_word_embeddings')}"
                                      f" from the GGUF, the model has {tied}")
