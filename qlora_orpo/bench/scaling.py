"""On paper: per-GPU memory and optimizer-step time under DDP and FSDP2, from the floor model.

Nothing here is measured. Memory is :func:`floor.memory_floor` per rank with the GPU dtypes
(bfloat16 residual stream and unquantised tensors, float32 LoRA and AdamW), redistributed
the way each engine does; time is :func:`flops.step_flops` at an assumed matmul rate plus
ring-collective traffic at an assumed bus bandwidth. The assumptions are the arguments.

* DDP: every rank holds the whole model, its LoRA gradients, AdamW states and one more copy
  of the gradients in DDP's reduction buckets; per step it all-reduces the LoRA gradients
  once (``2 (G-1)/G`` of their bytes over the bus).
* FSDP2 (``reshard_after_forward``): every persistent tensor (4-bit weights, statistics,
  unquantised tensors, LoRA weights, gradients, AdamW states) is split G ways; while a
  layer runs its whole parameters are gathered (counted: two layers, the running one and
  the prefetched one), and the root's (embedding, final norm, ``lm_head``) stay gathered
  through the root's forward. Under ``no_sync`` the accumulated gradients are unsharded
  (one full copy). Traffic per split micro-batch: five all-gathers of the model (forwards
  a, b, c and the two backwards, which recompute under checkpointing), ``(G-1)/G`` of its
  bytes each, and one reduce-scatter of the LoRA gradients per optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..models.floor import MIB, ModelShape, memory_floor
from .flops import step_flops

GIB = 1024 * MIB
LLAMA_8B = ModelShape(hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, intermediate=14336,
                      vocab=128256, tied_embeddings=False)
LLAMA_70B = ModelShape(hidden=8192, layers=80, heads=64, kv_heads=8, head_dim=128, intermediate=28672,
                       vocab=128256, tied_embeddings=False)


@dataclass(frozen=True)
class Assumptions:
    seq_len: int = 1024  # tokens per side
    global_pairs: int = 8  # pairs per optimizer step over all GPUs (one pair per micro-batch)
    lora_r: int = 16
    matmul_flops: float = 300e12  # effective bf16 rate with 4-bit dequantisation (H100 SXM: 989e12 peak)
    bus_bytes_per_s: float = 300e9  # ring collective bus bandwidth (NVLink 4; PCIe 4.0 x16 is about 20e9)


@dataclass(frozen=True)
class Estimate:
    engine: str
    gpus: int
    memory_bytes: int
    compute_s: float
    comm_s: float

    @property
    def step_s(self) -> float:
        return self.compute_s + self.comm_s  # no overlap assumed: an upper estimate


def estimate(shape: ModelShape, engine: str, gpus: int, a: Assumptions = Assumptions()) -> Estimate:
    """Per-GPU memory floor and optimizer-step time of ``engine`` (ddp/fsdp2) on ``gpus`` GPUs."""
    floor = memory_floor(shape, a.seq_len, a.lora_r, chunk_size=64, activation_bytes=2)
    unquantised = 2 * shape.full_precision_params  # bfloat16 on a GPU (models/loader.py)
    persistent = floor.weights_4bit + floor.quant_stats + unquantised + floor.lora_weights
    activations = floor.backward_bytes - floor.lora_grads  # boundaries + max(layer, logits chunk)
    pairs_per_gpu = a.global_pairs / gpus
    compute = pairs_per_gpu * step_flops(shape, a.seq_len, a.lora_r).total / a.matmul_flops
    if engine == "ddp":
        memory = persistent + floor.optimizer_states + 2 * floor.lora_grads + activations
        comm = 2 * (gpus - 1) / gpus * floor.lora_grads / a.bus_bytes_per_s
    elif engine == "fsdp2":
        sharded = (persistent + floor.optimizer_states + floor.lora_grads) / gpus
        layer = (floor.weights_4bit + floor.quant_stats + floor.lora_weights) / shape.layers
        root = unquantised - 2 * (2 * shape.layers) * shape.hidden  # embedding, lm_head, final norm
        memory = int(sharded + 2 * layer + root + floor.lora_grads + activations)
        model_bytes = floor.weights_4bit + floor.quant_stats + unquantised + floor.lora_weights
        gathers = 5 * pairs_per_gpu * (gpus - 1) / gpus * model_bytes
        comm = (gathers + (gpus - 1) / gpus * floor.lora_grads) / a.bus_bytes_per_s
    else:
        raise ValueError(f"engine {engine!r} is not ddp or fsdp2")
    return Estimate(engine, gpus, int(memory), compute, comm)


def markdown(a: Assumptions = Assumptions()) -> str:
    rows = ["| base | engine | GPUs | GiB per GPU | compute s | comm s | s per step |", "|---|---|---:|---:|---:|---:|---:|"]
    for name, shape in (("8B", LLAMA_8B), ("70B", LLAMA_70B)):
        for engine in ("ddp", "fsdp2"):
            for gpus in (1, 2, 4, 8):
                e = estimate(shape, engine, gpus, a)
                rows.append(f"| {name} | {engine} | {gpus} | {e.memory_bytes / GIB:.1f} | {e.compute_s:.2f} | "
                            f"{e.comm_s:.3f} | {e.step_s:.2f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown())
