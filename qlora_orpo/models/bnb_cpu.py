"""bitsandbytes on the CPU: a quiet import, and the work-around for its repacking bug.

:func:`disable_bnb_cpu_repacking` must run right after every 4-bit load, before any
evaluation or ``generate``: without it most LoRA layers silently stop learning on
AVX512-BF16 CPUs (see its docstring). ``model.load_base`` calls it.
"""

from __future__ import annotations

import logging

import torch

from ..core.errors import ModelError


def disable_bnb_cpu_repacking(model: torch.nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference; return the layers changed.

    On a CPU with AVX512-BF16, ``bnb.nn.Linear4bit.forward`` converts its weight to a
    packed inference layout the first time it runs in eval mode on an input that does not
    require grad (an evaluation pass, ``generate``). The conversion is permanent, and the
    packed path (``F.gemv_4bit``) has no autograd kernel: no gradient flows back through
    the frozen base weight to the layer's input any more, only through the LoRA branch.
    Measured on SmolLM2-135M (r=16, all linear): with a fresh adapter (B = 0) the LoRA B
    of q, k, v, gate and up then get exactly zero gradient in every layer (150 of 210);
    only o_proj and down_proj, which write straight into the residual stream, still learn.
    With B != 0 every LoRA gradient is wrong. Training silently stalls.

    The layer checks the instance attribute ``support_avx512bf16_for_cpu`` (set from
    ``has_avx512bf16()`` in ``__init__``); clearing it keeps every layer on the
    differentiable dequantise-and-matmul path.

    A layer that was already repacked is converted back with bitsandbytes' inverse. That is
    lossy (the absmax went through bfloat16 and is re-quantised for double quantisation):
    on SmolLM2 the loss moved by 0.3% and gradients by up to 10%, so call this right after
    loading, before any evaluation, as load_model_for_training does.
    Without bitsandbytes installed there is nothing to do and the result is 0.
    """
    if not import_bitsandbytes_quietly(required=False):
        return 0
    import bitsandbytes as bnb

    changed = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        touched = False
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            touched = True
        state = getattr(module.weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                module.weight.data, state
            )
            module.quant_state = module.weight.quant_state
            touched = True
        changed += touched
    return changed


def import_bitsandbytes_quietly(required: bool) -> bool:
    """Import bitsandbytes without its CPU warning that asks to `pip install kernels`; True if imported.

    On AVX512-BF16 CPUs bitsandbytes tries to fetch an optional hub kernel at import and
    logs a warning when it cannot; the built-in kernel it falls back to works, and the
    suggested package downloads code from the hub at run time. ``required`` turns a
    missing or broken bitsandbytes into a ModelError instead of False.
    """
    cpu_logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    previous = cpu_logger.level
    cpu_logger.setLevel(logging.ERROR)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        if required:
            raise ModelError(
                f"4-bit quantisation needs bitsandbytes, which cannot be imported ({exc})"
            ) from exc
        return False
    finally:
        cpu_logger.setLevel(previous)
    return True
