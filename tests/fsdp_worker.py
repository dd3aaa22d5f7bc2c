"""Run by ``torchrun`` in tests/test_distributed.py: one split step under DDP and under FSDP2.

``python fsdp_worker.py MODEL_DIR OUT_DIR``: loads the tiny model at MODEL_DIR in NF4 with the
packed weights stored in float32 (FSDP-QLoRA), adds LoRA, and runs one split step on this
rank's micro-batch twice, once under DDP and once sharded with FSDP2 on a CPU gloo mesh,
then one AdamW step. Rank 0 writes ``OUT_DIR/grads.safetensors`` (``ddp/<name>``,
``fsdp2/<name>``: full gradients; ``after/<name>``: FSDP2's LoRA weights after the step,
``ddp_after/<name>``: DDP's) and ``OUT_DIR/shards.json`` (each 4-bit weight's local and full
numbers of elements under FSDP2).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from conftest import random_tokenized_pairs
from safetensors.torch import save_file

from qlora_orpo.data.collate import collate_pairs
from qlora_orpo.training import distributed
from qlora_orpo.training.step import OrpoStep, SideForward


def build(model_dir: str, rank0_only: bool = False):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig

    from qlora_orpo.models.loader import _enable_checkpointing, load_base
    from qlora_orpo.models.rank0_load import share_4bit_base

    if rank0_only:  # rank 0 loads, the other ranks build a meta skeleton (models/rank0_load.py)
        loaded = (load_base(model_dir, "nf4", "cpu", torch.float32, quant_storage=torch.float32)
                  if torch.distributed.get_rank() == 0 else None)
        base = share_4bit_base(loaded, AutoConfig.from_pretrained(model_dir), torch.float32, torch.float32)
    else:
        base = load_base(model_dir, "nf4", "cpu", torch.float32, quant_storage=torch.float32)
    _enable_checkpointing(base)
    base.enable_input_require_grads()
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(base, lora, autocast_adapter_dtype=True)


def one_step(model, wrapped, dist, batch) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(params.values(), lr=1e-2)
    step = OrpoStep(model, 0.5, "split", 8, forward=wrapped, no_sync=dist.no_sync(wrapped))
    step(batch, loss_scale=1.0)

    def full(t: torch.Tensor) -> torch.Tensor:
        return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()

    grads = {n: full(p.grad) for n, p in params.items()}
    optimizer.step()
    return grads, {n: full(p) for n, p in params.items()}


def main(model_dir: str, out: str) -> int:
    dist = distributed.init(torch.device("cpu"))
    vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
    batch = collate_pairs(random_tokenized_pairs(2, vocab, seed=10 + dist.rank), 0)

    model = build(model_dir)
    ddp_grads, ddp_after = one_step(model, distributed.wrap_ddp(SideForward(model, 8), torch.device("cpu")), dist, batch)

    model = build(model_dir)
    dist.sharding = "fsdp2"
    sharded = dist.wrap(SideForward(model, 8), torch.device("cpu"))
    shards = {n: [p.to_local().numel(), p.numel()] for n, p in model.named_parameters() if "base_layer" in n}
    fsdp_grads, fsdp_after = one_step(model, sharded, dist, batch)

    model = build(model_dir, rank0_only=True)
    skeleton = any(p.is_meta for p in model.parameters())
    sharded = dist.wrap(SideForward(model, 8), torch.device("cpu"))
    rank0_grads, rank0_after = one_step(model, sharded, dist, batch)
    skeletons = [0, 0]
    torch.distributed.all_gather_object(skeletons, skeleton)
    if dist.is_main:
        tensors = {f"ddp/{n}": t for n, t in ddp_grads.items()} | {f"fsdp2/{n}": t for n, t in fsdp_grads.items()}
        tensors |= {f"after/{n}": t for n, t in fsdp_after.items()} | {f"ddp_after/{n}": t for n, t in ddp_after.items()}
        tensors |= {f"rank0/{n}": t for n, t in rank0_grads.items()} | {f"rank0_after/{n}": t for n, t in rank0_after.items()}
        save_file(tensors, os.path.join(out, "grads.safetensors"))
        Path(out, "shards.json").write_text(json.dumps(shards))
        Path(out, "skeletons.json").write_text(json.dumps(skeletons))
    dist.barrier()  # no rank tears the group down while another's collectives are in flight
    dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
