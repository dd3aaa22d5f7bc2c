"""GGUF export: base + adapter -> one ``.gguf`` file for llama.cpp, LM Studio and Ollama, verified.

:func:`export_gguf` merges the adapter into the float32 base exactly as
:func:`~qlora_orpo.export.merged.export_merged` does, then writes the merged weights with the ``gguf``
package alone (no llama.cpp build): architecture metadata, the tokenizer (byte-level BPE in
:mod:`qlora_orpo.export.gguf_vocab`, SentencePiece in :mod:`qlora_orpo.export.gguf_spm`), and each
tensor under its GGUF name. Supported: the Llama family (``llama``, ``mistral``: SmolLM, Llama 2/3/3.1/3.2,
Mistral), ``qwen2``, Gemma-2, Gemma-3 (text) and Phi-3, with what each family adds in
:mod:`qlora_orpo.export.gguf_families`. For ``llama``, llama.cpp's rotary layout differs from transformers': the rows of
``q_proj`` and ``k_proj`` are permuted per head (the two rotary halves interleaved), as
llama.cpp's ``convert_hf_to_gguf.py`` does; Qwen2's llama.cpp graph uses the transformers
("neox") layout, so it is written unpermuted. Norms and biases are always F32; ``--quant``
applies to matrices: f32, f16, or a mix chosen per tensor as llama.cpp's ``llama-quantize``
chooses it (:mod:`qlora_orpo.export.gguf_mix`: q8_0, q6_k, q5_k_m, q4_k_m, q5_0, q4_0, with
llama.cpp's fallbacks for row lengths its blocks do not divide), the K-quants written by
:mod:`qlora_orpo.export.gguf_kquants`. Tied embeddings are written once as ``token_embd`` with no ``output``
tensor, which is how llama.cpp and transformers recognise them.

An Ollama ``Modelfile`` is written beside the file: the template as plain text around each
message (when the chat template is that simple), the default system prompt, and the stop
tokens, including the chat template's end-of-turn token (not only EOS).

Verification, before the file is published: a ``python -I`` subprocess that never imports
``qlora_orpo`` runs the file in llama.cpp itself when ``llama-cpp-python`` is installed
(:mod:`qlora_orpo.export.gguf_llamacpp`), else loads it with plain transformers (``gguf_file=``,
which dequantises it); the result names its judge. Either checks that its tokenizer encodes a mixed text (spaces, tabs, digits, accents, CJK, the
special tokens) and the verification conversations to the same ids, and computes logits and
greedy continuations (:mod:`qlora_orpo.export.gguf_verify`). The largest absolute logit difference
from the merged float32 model must stay within its ``gguf_tolerance``; otherwise the export
fails and nothing is left.
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..core.files import atomic_write_text
from . import gguf_llamacpp  # through the module, so that tests can make llama.cpp absent
from .adapters import adapter_tokenizer_dir, load_adapter, read_adapter, resolve_base
from .card import public_name
from .gguf_families import (
    FAMILY_ARCHS,
    NORM_PLUS_ONE,
    check_family,
    extra_tensors,
    rope_dimension_count,
    rope_parameters,
    shift_norm,
    transformers_blind_spot,
    write_family_metadata,
)
from .gguf_kquants import quantize
from .gguf_mix import is_70b, tensor_type
from .gguf_spm import build_any_vocab, write_any_vocab
from .gguf_verify import GREEDY_TOKENS, QUANTS, GGUFCheck, reference_outputs
from .gguf_vocab import MODELFILE_HEADER, Vocab, render_modelfile
from .merged import log
from .verify import VERIFY_MAX_TOKENS, ExportError, encode_texts, reference_logits, verification_texts

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# gguf.LlamaFileType: ALL_F32, MOSTLY_F16, MOSTLY_Q8_0, MOSTLY_Q6_K, MOSTLY_Q5_K_M, MOSTLY_Q4_K_M, MOSTLY_Q5_0, MOSTLY_Q4_0
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "q6_k": 18, "q5_k_m": 17, "q4_k_m": 15, "q5_0": 8, "q4_0": 2}
SUPPORTED = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", **FAMILY_ARCHS}  # model_type -> GGUF arch
PERMUTE_QK = {"llama"}  # GGUF archs whose llama.cpp graph wants llama.cpp's rotary row order
OURS_KEY = "qlora_orpo.adapter"  # marks a file as our export, so that a later export may replace it


@dataclass
class GGUFExportResult:
    path: str
    modelfile: str
    quant: str
    bytes: int
    seconds: float
    end_of_turn: str | None
    check: GGUFCheck | None  # None when not verified

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Architecture and tensors
# ---------------------------------------------------------------------------------------------


def gguf_arch(config: Any, where: str) -> str:
    """The GGUF architecture of a transformers ``config``; a one-line error for anything unsupported."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        raise ExportError(f"{where}: architecture {model_type!r} cannot be exported to GGUF; "
                          f"supported: {', '.join(SUPPORTED)}")
    check_family(config, model_type, SUPPORTED[model_type], where)  # rope types, biases, family rules
    return SUPPORTED[model_type]


def _rope_theta(config: Any) -> float:
    return float(rope_parameters(config).get("rope_theta", 10000.0))  # of the global layers (Gemma-3)


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
        tensors[target] = shift_norm(arch, name, data)
    return {**tensors, **extra_tensors(config, arch)}


def encode_tensor(name: str, tensor: torch.Tensor, quant: str, n_layer: int = 0, *, tied: bool = False,
                  llm_type_70b: bool = False) -> tuple[np.ndarray, Any]:
    """``(data, ggml type)`` of one tensor: 1-D in F32 (norms, biases), matrices in ``quant``'s type for them.

    ``n_layer``, ``tied`` and ``llm_type_70b`` feed the mix rules (:func:`~qlora_orpo.export.gguf_mix.tensor_type`).
    """
    import gguf

    array = tensor.float().cpu().numpy()
    F = gguf.GGMLQuantizationType
    if array.ndim == 1 or quant == "f32":
        return array, F.F32
    qtype = F.F16 if quant == "f16" else tensor_type(name, array.shape, quant, n_layer, tied=tied,
                                                      llm_type_70b=llm_type_70b)
    if qtype == F.F32:
        return array, F.F32
    if qtype != F.F16:
        return quantize(array, qtype), qtype
    half = array.astype(np.float16)
    if not np.isfinite(half).all():
        raise ExportError(f"{name}: a weight is out of float16 range; export with --quant f32")
    return half, F.F16


def write_gguf(path: Path, model: PreTrainedModel, vocab: Vocab, arch: str, quant: str, name: str, adapter: str) -> None:
    """Write ``model`` with the tokenizer metadata ``vocab`` to ``path``; ``adapter`` is recorded under :data:`OURS_KEY`."""
    import gguf

    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
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
    writer.add_rope_dimension_count(rope_dimension_count(config, arch))
    if head_dim != config.hidden_size // heads or arch in NORM_PLUS_ONE:  # llama.cpp: hidden / heads unless told
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(FILE_TYPES[quant])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_family_metadata(writer, config, arch)
    write_any_vocab(writer, vocab)
    tensors = gguf_tensors(model, arch)
    big = is_70b(arch, config.num_hidden_layers, heads, getattr(config, "num_key_value_heads", None) or heads)
    for tensor_name, tensor in tensors.items():
        data, qtype = encode_tensor(tensor_name, tensor, quant, config.num_hidden_layers,
                                    tied="output.weight" not in tensors, llm_type_70b=big)
        writer.add_tensor(tensor_name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def export_gguf(
    adapter_dir: str | Path | None,
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
    ``adapter_dir`` None writes the model ``base`` names alone: the base GGUF that an adapter
    file of :mod:`qlora_orpo.export.gguf_lora` runs on (llama.cpp ``--lora``, Ollama ``ADAPTER``).

    ``base``/``force``/``texts`` as in :func:`~qlora_orpo.export.merged.export_merged`. The file is
    written to a temporary sibling and renamed once verified; an existing ``out_path`` is
    replaced only if it is an earlier export of ours, an existing ``Modelfile`` only if we wrote it.
    """
    from transformers import AutoConfig, AutoTokenizer

    from ..models.loader import load_base, resolve_model_path
    from .adapters import AdapterInfo

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
    if adapter_dir is None and not base:
        raise ExportError("export: without --adapter, name the model to export with --model")
    alone = adapter_dir is None
    info = None if alone else read_adapter(adapter_dir, require_card=not force)
    base_path = resolve_model_path(str(base)) if alone else resolve_base(info, base)
    # Alone, a card-less AdapterInfo of the base stands in: its tokenizer, the built-in prompts.
    info = info or AdapterInfo(Path(base_path), {}, None)
    try:
        config = AutoConfig.from_pretrained(base_path)
        arch = gguf_arch(config, f"base {base_path}")  # refuse before loading weights
        tokenizer = AutoTokenizer.from_pretrained(adapter_tokenizer_dir(info.path) or base_path)  # its template
        vocab = build_any_vocab(tokenizer, config.vocab_size)
    except (OSError, ValueError) as exc:
        raise ExportError(f"base {base_path}: cannot load ({str(exc).splitlines()[0]})") from exc
    # Only the transformers read-back has blind spots; llama.cpp, when installed, judges every family.
    judged_by_transformers = verify and not gguf_llamacpp.llama_cpp_available()
    blind = transformers_blind_spot(config, arch, getattr(vocab, "space_scheme", None)) if judged_by_transformers else None
    if blind:  # refuse before loading weights rather than fail (or pass) a check that cannot see the difference
        raise ExportError(f"base {base_path}: transformers' GGUF reader cannot verify this {arch} file ({blind}); "
                          "install llama.cpp to judge it (pip install 'qlora_orpo[gguf]') or export without verification")
    model = load_base(base_path, "none", "cpu", torch.float32)  # merged in float32, never into 4-bit weights
    log(f"base {base_path} (float32, CPU); adapter {'none' if alone else info.path}; GGUF {arch} {quant}")
    peft_model = None if alone else load_adapter(model, tokenizer, info.path, force=force).eval()
    if verify:
        if texts is None:
            texts, _ = verification_texts(info, tokenizer)
        ids = encode_texts(tokenizer, texts, max_tokens)
        if alone:
            base_logits = reference_logits(model, ids)
        else:
            with peft_model.disable_adapter():
                base_logits = reference_logits(peft_model, ids)
    merged = model.eval() if alone else peft_model.merge_and_unload(safe_merge=True).eval()
    name = f"{(info.card or {}).get('qlora_orpo', {}).get('base', {}).get('name') or Path(base_path).name}"
    name += "" if alone else " ORPO"

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        log(f"writing {out} ({quant}; norms and biases F32)")
        # The adapter by its directory's name: a shared file must not carry this machine's paths.
        write_gguf(tmp, merged, vocab, arch, quant, name, "none" if alone else public_name(str(info.path.resolve())))
        check = None
        if verify:
            reference = reference_outputs(merged, tokenizer, texts, ids, vocab.end_of_turn, greedy_tokens)
            del merged, model, peft_model
            gc.collect()
            check = gguf_llamacpp.judge_gguf(tmp, out, quant, reference, base_logits, vocab)  # llama.cpp when installed
        size = tmp.stat().st_size
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    system = ((info.card or {}).get("qlora_orpo", {}).get("training") or {}).get("system_prompt") or None
    atomic_write_text(modelfile, render_modelfile(out.name, tokenizer, vocab.end_of_turn, system, add_bos=vocab.add_bos))
    result = GGUFExportResult(path=str(out), modelfile=str(modelfile), quant=quant, bytes=size,
                              seconds=time.perf_counter() - start, end_of_turn=vocab.end_of_turn, check=check)
    verdict = "not verified"
    if check is not None:
        verdict = (f"judged by {check.judge}: max |GGUF - merged| logit difference {check.max_abs_diff:.3g} <= tolerance {check.tolerance:.3g}"
                   f", top-1 agreement {check.top1_agreement:.3f}, greedy identical {check.greedy_identical}/"
                   f"{check.greedy_runs}")
        if not alone and check.adapter_effect <= check.tolerance:  # alone, there is no adapter to see
            log(f"note: the adapter moves logits by at most {check.adapter_effect:.3g}, within the {quant} "
                f"tolerance {check.tolerance:.3g}; this check cannot tell a merged adapter from a missing one")
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


