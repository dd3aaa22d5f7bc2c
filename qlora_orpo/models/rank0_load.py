"""Loading a 4-bit base once per job for FSDP2: rank 0 reads and quantises, the others build a skeleton.

Without this every rank loads and quantises the whole model onto its own device before FSDP2
shards it, which is what FSDP2 is there to avoid. As accelerate's FSDP-QLoRA recipe does
(``cpu_ram_efficient_loading``), rank 0 alone loads the checkpoint (into host memory when the
ranks train on GPUs), and every other rank builds the same modules on the meta device, so
it holds no weights at all until ``training.distributed.shard_fsdp2`` gives it its shard.

bitsandbytes keeps each 4-bit layer's quantisation state (block absmax, its own second-level
quantisation, the code book) outside the parameters, and FSDP2 does not shard it: every rank
needs all of it (about 1/32 of the packed weights). Rank 0 sends it in the form bitsandbytes
serialises it (``QuantState.as_dict(packed=True)``, tensors only), described by a JSON
manifest and carried in one byte buffer: no pickle crosses the wire.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch
from torch import nn

from ..core.launcher import collective_device
from .bnb_cpu import disable_bnb_cpu_repacking

MANIFEST_VERSION = 1


def _linear4bit_modules(model: nn.Module) -> dict[str, nn.Module]:
    import bitsandbytes as bnb

    return {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"not a torch dtype: {name!r}")
    return dtype


def describe_4bit_layers(model: nn.Module) -> tuple[dict[str, Any], torch.Tensor]:
    """Rank 0's side: a JSON-able manifest of every 4-bit layer and one uint8 buffer of their quant states.

    Manifest: ``{"version", "bytes", "layers": {module name: {"in", "out", "bias", "quant_type",
    "blocksize", "compress_statistics", "weight": [shape, dtype], "state": {key: [shape, dtype,
    offset]}}}}``; ``offset`` is where the tensor's bytes start in the buffer.
    """
    layers: dict[str, Any] = {}
    chunks: list[torch.Tensor] = []
    offset = 0
    for name, module in _linear4bit_modules(model).items():
        weight = module.weight
        state = weight.quant_state
        entries = {}
        for key, tensor in state.as_dict(packed=True).items():
            raw = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
            entries[key] = [list(tensor.shape), str(tensor.dtype), offset]
            chunks.append(raw)
            offset += raw.numel()
        layers[name] = {
            "in": module.in_features, "out": module.out_features, "bias": module.bias is not None,
            "quant_type": weight.quant_type, "blocksize": weight.blocksize,
            "compress_statistics": weight.compress_statistics,
            "weight": [list(weight.shape), str(weight.dtype)], "state": entries,
        }
    buffer = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.uint8)
    return {"version": MANIFEST_VERSION, "bytes": offset, "layers": layers}, buffer


def build_4bit_skeleton(
    config: Any, manifest: dict[str, Any], buffer: torch.Tensor, compute_dtype: torch.dtype, dtype: torch.dtype
) -> nn.Module:
    """Another rank's side: the model's modules on the meta device, 4-bit layers as rank 0 has them.

    Every parameter and buffer is on the meta device (``training.distributed.shard_fsdp2``
    allocates this rank's shards and fills them from rank 0); the quant states are real, on
    the CPU, from ``buffer``.
    """
    import bitsandbytes as bnb
    from bitsandbytes.functional import QuantState
    from transformers import AutoModelForCausalLM

    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(f"rank 0 sent a 4-bit manifest of version {manifest.get('version')}, expected {MANIFEST_VERSION}")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, spec in manifest["layers"].items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        state = {}
        for key, (shape, type_name, offset) in spec["state"].items():
            tensor_dtype = _dtype(type_name)
            size = math.prod(shape) * torch.empty(0, dtype=tensor_dtype).element_size()
            state[key] = buffer[offset: offset + size].clone().view(tensor_dtype).reshape(shape)
        quant_state = QuantState.from_dict(state, device=torch.device("cpu"))
        shape, storage = spec["weight"]
        layer = bnb.nn.Linear4bit(
            spec["in"], spec["out"], bias=spec["bias"], compute_dtype=compute_dtype,
            compress_statistics=spec["compress_statistics"], quant_type=spec["quant_type"],
            quant_storage=_dtype(storage), device="meta",
        )
        layer.weight = bnb.nn.Params4bit(
            torch.empty(shape, dtype=_dtype(storage), device="meta"), requires_grad=False,
            quant_state=quant_state, blocksize=spec["blocksize"], compress_statistics=spec["compress_statistics"],
            quant_type=spec["quant_type"], quant_storage=_dtype(storage), module=layer, bnb_quantized=True,
        )
        layer.quant_state = quant_state
        if spec["bias"]:
            layer.bias = nn.Parameter(torch.empty(spec["out"], dtype=dtype, device="meta"), requires_grad=False)
        setattr(parent, child, layer)
    model.is_loaded_in_4bit = True
    disable_bnb_cpu_repacking(model)  # as load_base does: fresh layers would repack on an eval pass
    model.requires_grad_(False)
    model.eval()
    return model


def share_4bit_base(model: nn.Module | None, config: Any, compute_dtype: torch.dtype, dtype: torch.dtype) -> nn.Module:
    """Collective: rank 0 passes its loaded 4-bit ``model`` and gets it back; every other rank
    passes ``None`` and gets the meta skeleton (:func:`build_4bit_skeleton`)."""
    import torch.distributed as dist

    rank = dist.get_rank()
    device = collective_device()
    if rank == 0:
        manifest, buffer = describe_4bit_layers(model)
        text = json.dumps(manifest).encode()
    size = torch.tensor([len(text) if rank == 0 else 0, buffer.numel() if rank == 0 else 0], device=device)
    dist.broadcast(size, src=0)
    text_bytes = (torch.frombuffer(bytearray(text), dtype=torch.uint8).to(device) if rank == 0
                  else torch.empty(int(size[0]), dtype=torch.uint8, device=device))
    dist.broadcast(text_bytes, src=0)
    state_bytes = buffer.to(device) if rank == 0 else torch.empty(int(size[1]), dtype=torch.uint8, device=device)
    dist.broadcast(state_bytes, src=0)
    if rank == 0:
        return model
    manifest = json.loads(text_bytes.cpu().numpy().tobytes().decode())
    return build_4bit_skeleton(config, manifest, state_bytes.cpu(), compute_dtype, dtype)
