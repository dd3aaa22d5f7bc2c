"""Per-family GGUF metadata and tensors, as llama.cpp's ``convert_hf_to_gguf.py`` writes them.

:mod:`qlora_orpo.export.gguf` writes what every family shares (sizes, heads, rope base, norms'
epsilon) and the weights under their GGUF names; this module adds what one family needs on top,
and refuses, before any weight is loaded, a configuration llama.cpp's graph would compute
differently. Each rule cites the converter class it follows (``conversion/<file>.py`` in
llama.cpp) or the llama.cpp model file (``src/models/<arch>.cpp``) it satisfies:

* **Llama 3.1/3.2** (``rope_type = llama3``): a ``rope_freqs.weight`` tensor of ``head_dim / 2``
  divisors of the rotary frequencies, computed exactly as ``LlamaModel.generate_extra_tensors``
  does (:func:`llama3_rope_factors`); llama.cpp divides each frequency by its factor.
* **Gemma-2** (``gemma2``): attention and final logit soft-capping and the sliding window as
  metadata; every ``*norm.weight`` stored as ``1 + w`` (Gemma's RMSNorm multiplies by ``1 + w``,
  llama.cpp's by the stored weight); the ``sqrt(hidden)`` embedding scale is in llama.cpp's
  graph, so nothing is written for it. llama.cpp scales queries by ``1/sqrt(head_dim)`` (by
  ``1/sqrt(hidden/heads)`` for the 27B layer count), so another ``query_pre_attn_scalar`` is refused.
* **Gemma-3 text** (``gemma3_text`` -> ``gemma3``): as Gemma-2 without attention soft-capping,
  plus q/k norms (also ``1 + w``), the local layers' rope base (``rope.freq_base_swa``) and the
  global layers' linear rope scaling.
* **Phi-3** (``phi3``): the fused ``qkv_proj`` and ``gate_up_proj`` are written fused, as
  llama.cpp's ``phi3`` graph reads them (``attn_qkv``, ``ffn_up`` of ``2 * n_ff`` rows, gate
  first); the rotary dimension ``int(partial_rotary_factor * hidden) // heads``; the original
  context length; ``sliding_window`` as the converter writes it (llama.cpp's phi3 ignores it).
  Long-context ``longrope`` checkpoints (Phi-3-128k, Phi-3.5) get ``rope_factors_long``/``_short``
  and ``rope.scaling.attn_factor = sqrt(1 + ln(max / original) / ln(original))`` as
  ``Phi3MiniModel.generate_extra_tensors`` writes them. llama.cpp picks the long factors when its
  context (``n_ctx``) exceeds the original length, transformers when the sequence does; a config
  whose ``factor`` or ``attention_factor`` differs from what llama.cpp derives is refused.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .verify import ExportError

# transformers model_type -> GGUF architecture, for the families this module adds.
FAMILY_ARCHS = {"gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3"}
NORM_PLUS_ONE = {"gemma2", "gemma3"}  # Gemma's RMSNorm computes x * (1 + w); llama.cpp's x * w
# llama.cpp's default sliding-window layer pattern per architecture (load_swa_pattern(ml, n)):
# layer i is local when i % n < n - 1. A config whose layer_types differ gets the explicit array.
SWA_PATTERN = {"gemma2": 2, "gemma3": 6}
ROPE_TYPES = {  # rope types each GGUF architecture can express (of its global/full-attention layers)
    "llama": ("default", "llama3"), "qwen2": ("default",), "gemma2": ("default",),
    "gemma3": ("default", "linear"), "phi3": ("default", "longrope"),
}
BIG_GEMMA_LAYERS = {"gemma2": 46, "gemma3": 62}  # llama.cpp's LLM_TYPE_27B, scaled by hidden / heads


def rope_parameters(config: Any, layer_type: str = "full_attention") -> dict[str, Any]:
    """The rope settings of ``layer_type`` layers: ``rope_parameters`` (nested per layer type for
    Gemma-3), else the older ``rope_scaling`` plus ``rope_theta``; ``rope_type`` always set."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope = dict(rope.get(layer_type, rope) if isinstance(rope, dict) else {})
    if "rope_type" not in rope:
        rope["rope_type"] = rope.get("type", "default") or "default"
    if "rope_theta" not in rope and getattr(config, "rope_theta", None) is not None:
        rope["rope_theta"] = float(config.rope_theta)
    return rope


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def check_family(config: Any, model_type: str, arch: str, where: str) -> None:
    """Refuse, on one line, a ``config`` whose GGUF llama.cpp would run differently from transformers."""
    rope_type = rope_parameters(config)["rope_type"]
    if rope_type not in ROPE_TYPES[arch]:
        extra = " (Phi-3 long-context checkpoints need long/short rope factor tensors)" if rope_type == "longrope" else ""
        raise ExportError(f"{where}: rope scaling {rope_type!r} is not supported by the GGUF export for "
                          f"{model_type}{extra}; supported: {', '.join(ROPE_TYPES[arch])}")
    if arch in ("llama", "gemma2", "gemma3") and (getattr(config, "attention_bias", False)
                                                   or getattr(config, "mlp_bias", False)):
        raise ExportError(f"{where}: {model_type} with attention/mlp biases is not supported by the GGUF export")
    if model_type == "qwen2" and getattr(config, "use_sliding_window", False):
        raise ExportError(f"{where}: qwen2 with use_sliding_window is not supported by the GGUF export")
    if arch in NORM_PLUS_ONE:
        _check_gemma(config, model_type, arch, where)
    if arch == "phi3" and rope_type == "longrope":
        _check_longrope(config, where)


def longrope_attn_factor(config: Any) -> float:
    """The attention factor llama.cpp applies with longrope (Phi3MiniModel.generate_extra_tensors)."""
    rope = rope_parameters(config)
    original = rope["original_max_position_embeddings"]
    scale = config.max_position_embeddings / original
    return math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1.0 else 1.0


def _check_longrope(config: Any, where: str) -> None:
    rope = rope_parameters(config)
    half = rope_dimension_count(config, "phi3") // 2
    long, short = rope.get("long_factor") or [], rope.get("short_factor") or []
    if len(long) != half or len(short) != half or not rope.get("original_max_position_embeddings"):
        raise ExportError(f"{where}: phi3 longrope needs long_factor and short_factor of {half} values and "
                          "original_max_position_embeddings")
    scale = config.max_position_embeddings / rope["original_max_position_embeddings"]
    factor, attn = rope.get("factor"), rope.get("attention_factor")
    if (factor is not None and not math.isclose(factor, scale)) or (
            attn is not None and not math.isclose(attn, longrope_attn_factor(config), rel_tol=1e-6)):
        raise ExportError(f"{where}: phi3 longrope with factor/attention_factor other than llama.cpp derives from "
                          "max_position_embeddings / original_max_position_embeddings is not supported")


def _check_gemma(config: Any, model_type: str, arch: str, where: str) -> None:
    head_dim = _head_dim(config)
    scalar = getattr(config, "query_pre_attn_scalar", head_dim)
    big = (config.num_hidden_layers == BIG_GEMMA_LAYERS[arch]
           and scalar == config.hidden_size // config.num_attention_heads)
    if scalar != head_dim and not big:  # llama.cpp hard-codes the query scale (src/models/gemma2.cpp)
        raise ExportError(f"{where}: {model_type} with query_pre_attn_scalar {scalar} != head_dim {head_dim} "
                          "is not supported by the GGUF export (llama.cpp scales queries by 1/sqrt(head_dim))")
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    if act not in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):  # llama.cpp's Gemma graph uses tanh GELU
        raise ExportError(f"{where}: {model_type} with activation {act!r} is not supported by the GGUF export")
    if arch == "gemma3":
        local = rope_parameters(config, "sliding_attention")["rope_type"]
        if local != "default":
            raise ExportError(f"{where}: gemma3 local-layer rope scaling {local!r} is not supported by the GGUF export")


def rope_dimension_count(config: Any, arch: str) -> int:
    """Rotary dimensions per head: all of ``head_dim``, except Phi-3's partial rotary factor."""
    if arch == "phi3":
        factor = rope_parameters(config).get("partial_rotary_factor") or getattr(config, "partial_rotary_factor",
                                                                                   None) or 1.0
        return int(factor * config.hidden_size) // config.num_attention_heads  # as Phi3MiniModel writes it
    return _head_dim(config)


def swa_layers(config: Any) -> list[bool] | None:
    """Per layer, whether it is a sliding-window (local) layer; None when the config does not say."""
    types = getattr(config, "layer_types", None)
    return [t == "sliding_attention" for t in types] if types else None


def write_family_metadata(writer: Any, config: Any, arch: str) -> None:
    """Add the family's own keys to a ``gguf.GGUFWriter`` (after the shared ones :mod:`.gguf` writes)."""
    if arch == "gemma2":  # Gemma2Model.set_gguf_parameters
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping or 0.0))
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping or 0.0))
        writer.add_sliding_window(int(config.sliding_window))
        _write_swa_pattern(writer, config, arch)
    elif arch == "gemma3":  # Gemma3Model.set_gguf_parameters and TextModel.set_gguf_parameters
        if getattr(config, "final_logit_softcapping", None):
            writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
        if any(swa_layers(config) or [True]):
            writer.add_sliding_window(int(config.sliding_window))
            writer.add_rope_freq_base_swa(float(rope_parameters(config, "sliding_attention")["rope_theta"]))
            _write_swa_pattern(writer, config, arch)
        rope = rope_parameters(config)
        if rope["rope_type"] == "linear":  # global layers only: llama.cpp keeps freq_scale_swa = 1
            import gguf

            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(rope["factor"]))
    elif arch == "phi3":  # Phi3MiniModel.set_gguf_parameters
        original = rope_parameters(config).get("original_max_position_embeddings") or getattr(
            config, "original_max_position_embeddings", None) or config.max_position_embeddings
        writer.add_rope_scaling_orig_ctx_len(int(original))
        writer.add_sliding_window(int(getattr(config, "sliding_window", None) or 0))
        if rope_parameters(config)["rope_type"] == "longrope":  # TextModel.set_gguf_parameters + generate_extra_tensors
            import gguf

            writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
            writer.add_rope_scaling_attn_factors(longrope_attn_factor(config))


def _write_swa_pattern(writer: Any, config: Any, arch: str) -> None:
    """The local/global layer array, only when it differs from llama.cpp's default for ``arch``
    (as the converter omits it, so older llama.cpp builds that know only the default still load)."""
    layers = swa_layers(config)
    n = SWA_PATTERN[arch]
    if layers is not None and layers != [i % n < n - 1 for i in range(len(layers))]:
        writer.add_sliding_window_pattern(layers)


def shift_norm(arch: str, hf_name: str, data: torch.Tensor) -> torch.Tensor:
    """Gemma's norms as ``1 + w`` (GemmaModel/Gemma2Model/Gemma3Model.modify_tensors); others unchanged."""
    if arch in NORM_PLUS_ONE and hf_name.endswith("norm.weight"):
        return data + 1
    return data


def llama3_rope_factors(rope: dict[str, Any], head_dim: int) -> torch.Tensor:
    """``rope_freqs``: per rotary frequency, the divisor llama.cpp applies, as ``LlamaModel.generate_extra_tensors``.

    ``freq_i = base ** (-2i / head_dim)``; wavelength ``2 pi / freq_i``. Wavelengths shorter than
    ``original / high_freq_factor`` keep their frequency (factor 1), longer than ``original /
    low_freq_factor`` are divided by ``factor``, and those between are interpolated smoothly:
    ``1 / ((1 - s) / factor + s)`` with ``s = (original / wavelength - low) / (high - low)``.
    Computed in float32 as the converter does, so the file is bit-identical to its output.
    """
    base = rope.get("rope_theta", 10000.0)
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    original = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = original / low, original / high
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def extra_tensors(config: Any, arch: str) -> dict[str, torch.Tensor]:
    """Tensors the family needs beyond the model's own weights (``rope_freqs.weight`` for llama3 rope)."""
    rope = rope_parameters(config)
    if arch == "llama" and rope["rope_type"] == "llama3":
        return {"rope_freqs.weight": llama3_rope_factors(rope, _head_dim(config))}
    if arch == "phi3" and rope["rope_type"] == "longrope":
        return {"rope_factors_long.weight": torch.tensor(rope["long_factor"], dtype=torch.float32),
                "rope_factors_short.weight": torch.tensor(rope["short_factor"], dtype=torch.float32)}
    return {}


def transformers_blind_spot(config: Any, arch: str, space_scheme: str | None) -> str | None:
    """Why transformers' GGUF reader would misread this file (so cannot verify it), or None.

    Read from ``transformers/integrations/ggml.py`` and ``integrations/gguf/*``: its config
    mapping has no key for rope scaling, the rope dimension count of phi3/gemma, soft-capping,
    the local rope base or the sliding-window layer array, so it falls back to the config class's
    defaults; its SentencePiece tokenizer is transformers' ``LlamaTokenizer`` (``Metaspace``,
    ``first`` when ``add_space_prefix`` else ``never``), a ``prepend`` normaliser for ``phi3``.
    ``space_scheme`` is :attr:`.gguf_spm.SpmVocab.space_scheme`, None for byte-level BPE.
    """
    rope = rope_parameters(config)
    if arch == "llama" and rope["rope_type"] == "llama3":
        return "it ignores the llama3 rope_freqs tensor"
    if arch == "phi3" and rope_dimension_count(config, arch) != _head_dim(config):
        return "it ignores phi3's partial rotary dimension count"
    if rope["rope_type"] == "longrope":
        return "it ignores longrope's factor tensors"
    if arch == "gemma2" and (config.attn_logit_softcapping, config.final_logit_softcapping) != (50.0, 30.0):
        return "it ignores gemma2 soft-capping values other than 50/30"
    if arch == "gemma3":
        return "it ignores gemma3's local rope base, rope scaling and sliding-window layout"
    if space_scheme is not None:
        reader = "prepend" if arch == "phi3" else ("first" if space_scheme in ("first", "always", "prepend") else "never")
        if reader != space_scheme:
            return f"its SentencePiece tokenizer adds the leading space as {reader!r}, this one as {space_scheme!r}"
    return None
