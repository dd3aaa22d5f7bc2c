"""Which GGML type each tensor gets under a quant mix users pick by name (``q4_k_m``...), as llama.cpp picks it.

A mix is a default type plus rules, ported from ``llama_tensor_get_type`` in llama.cpp's
``src/llama-quant.cpp`` (run without an importance matrix, ``--pure`` or overrides, on a dense
model: the Falcon and mixture-of-experts branches do not apply):

* ``output.weight``, and ``token_embd.weight`` when it doubles as the output (tied embeddings),
  go to Q6_K, unless the mix is q8_0 (stays Q8_0) or the row length is not a multiple of the
  default type's block (Q8_0). Untied, ``token_embd`` keeps the default type.
* ``q4_k_m``/``q5_k_m``: ``attn_v`` (and a fused ``attn_qkv``) and ``ffn_down`` go to Q6_K in the
  layers :func:`use_more_bits` picks: the first and last eighth and every third layer between.
  On a 70B-class model (llama.cpp's ``LLM_TYPE_70B``) the remaining Q4_K ``attn_v`` go to Q5_K.
* A row length that is not a multiple of the chosen type's block falls back as llama.cpp's
  ``tensor_type_fallback`` does: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, and F16 when not even
  a 32-weight block fits (llama.cpp refuses a Q4_0/Q5_0/Q8_0 default there; this export writes
  F16, as it always has for q8_0).

Layer counters: llama.cpp counts ``attn_v`` and ``ffn_down`` tensors in its sorted order
(by layer, then name), which for one such tensor per layer is the layer index read from
``blk.N.``; that is what is used here.
"""

from __future__ import annotations

import re
from typing import Any

MIXES: dict[str, tuple[str, str]] = {  # quant name -> (default GGML type, gguf.LlamaFileType member)
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q6_k": ("Q6_K", "MOSTLY_Q6_K"),
    "q5_k_m": ("Q5_K", "MOSTLY_Q5_K_M"),
    "q4_k_m": ("Q4_K", "MOSTLY_Q4_K_M"),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
}
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}  # llama.cpp's tensor_type_fallback
MORE_BITS_MIXES = ("q4_k_m", "q5_k_m")
_LAYER = re.compile(r"^blk\.(\d+)\.")


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the layers, and every third one between."""
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


def file_type(quant: str) -> int:
    """``general.file_type`` of a mix (a ``gguf.LlamaFileType`` value), e.g. 15 for ``q4_k_m``."""
    import gguf

    return int(gguf.LlamaFileType[MIXES[quant][1]])


def is_70b(arch: str, n_layer: int, n_head: int, n_head_kv: int) -> bool:
    """Whether llama.cpp sizes this model ``LLM_TYPE_70B`` (80 layers: Llama with GQA, Qwen2), which bumps attn_v."""
    return n_layer == 80 and (arch == "qwen2" or (arch == "llama" and n_head != n_head_kv))


def tensor_type(name: str, shape: tuple[int, ...], quant: str, n_layer: int, *, tied: bool = False,
                llm_type_70b: bool = False) -> Any:
    """The ``gguf.GGMLQuantizationType`` of tensor ``name`` (GGUF name, numpy ``shape (rows, cols)``) under ``quant``.

    ``n_layer``: the model's block count; ``tied``: the model has no ``output.weight`` (the token
    embedding is the output). 1-D tensors and norms stay F32, as in llama.cpp.
    """
    import gguf

    T = gguf.GGMLQuantizationType
    if quant not in MIXES:
        raise ValueError(f"quant: {quant!r} is not one of {', '.join(MIXES)}")
    if len(shape) < 2 or not name.endswith("weight") or "_norm.weight" in name:
        return T.F32
    default = MIXES[quant][0]
    chosen = default
    cols = int(shape[-1])
    layer = _LAYER.match(name)
    i_layer = int(layer.group(1)) if layer else 0
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        if cols % gguf.GGML_QUANT_SIZES[T[default]][0]:
            chosen = "Q8_0"
        elif default != "Q8_0":
            chosen = "Q6_K"
    elif "attn_v.weight" in name or "attn_qkv.weight" in name or "attn_kv_b.weight" in name:
        if quant in MORE_BITS_MIXES and use_more_bits(i_layer, n_layer):
            chosen = "Q6_K"
        if llm_type_70b and chosen == "Q4_K":  # GQA: attn_v is n_head/n_kv times smaller than attn_q
            chosen = "Q5_K"
    elif "ffn_down" in name:
        if quant in MORE_BITS_MIXES and use_more_bits(i_layer, n_layer):
            chosen = "Q6_K"
    return T[_fallback(chosen, cols)]


def _fallback(chosen: str, cols: int) -> str:
    """``chosen`` if rows of ``cols`` split into its blocks, else llama.cpp's fallback, else F16."""
    import gguf

    T = gguf.GGMLQuantizationType
    if cols % gguf.GGML_QUANT_SIZES[T[chosen]][0] == 0:
        return chosen
    chosen = FALLBACK.get(chosen, "F16")
    return chosen if chosen == "F16" or cols % gguf.GGML_QUANT_SIZES[T[chosen]][0] == 0 else "F16"
