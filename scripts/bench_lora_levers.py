"""The lean-LoRA levers side by side: 8 natural HH pairs, `shared`, no checkpointing, one process.

    python scripts/bench_lora_levers.py base,lean,lean-cache 3     # variants, rounds

Variants (joined by "-"): base = peft's forward; lean = models/lora_forward.py's; cache = every
4-bit weight kept dequantised (not shipped); nodrop = LoRA dropout 0. Rounds alternate between
variants; seconds per 8 pairs, min and mean. docs/benchmarks.md has the figures.
"""

import sys
import time

import bitsandbytes as bnb
import bitsandbytes.functional as bnb_functional
import torch
import torch.nn.functional as F
from peft.tuners.lora import bnb as peft_bnb

from qlora_orpo.config import OrpoConfig
from qlora_orpo.data.collate import collate_pairs
from qlora_orpo.data.mixture import load_run_data
from qlora_orpo.data.templating import tokenize_pairs
from qlora_orpo.models.loader import load_model_for_training
from qlora_orpo.models.lora_forward import _lean_class
from qlora_orpo.training.step import OrpoStep


def main(variants: list[str], rounds: int) -> None:
    cfg = OrpoConfig(max_length=512, eval_fraction=0.0, gradient_checkpointing=False)
    model, tok, info = load_model_for_training(cfg)
    model.train()
    pairs, _ = tokenize_pairs(load_run_data(cfg).train[:20], tok, 512, 256, progress=False)
    step = OrpoStep(model, beta=0.25, mode="shared", chunk_size=cfg.logits_chunk_size,
                    pad_token_id=tok.pad_token_id, pack_tokens=512)
    loras = [m for m in model.modules() if isinstance(m, peft_bnb.Linear4bit)]
    for m in loras:  # the dequantised copies, for the "cache" variants
        weight = m.base_layer.weight
        m.base_layer.cached_weight = bnb_functional.dequantize_4bit(weight.data, weight.quant_state).to(
            info.compute_dtype)
    lean_class, four_bit_forward = _lean_class(peft_bnb.Linear4bit), bnb.nn.Linear4bit.forward

    def cached_forward(self, x):
        return F.linear(x, self.cached_weight, self.bias)

    def use(variant: str) -> None:
        bnb.nn.Linear4bit.forward = cached_forward if "cache" in variant else four_bit_forward
        for m in loras:
            m.__class__ = lean_class if "lean" in variant else peft_bnb.Linear4bit
            m.lora_dropout[m.active_adapters[0]].p = 0.0 if "nodrop" in variant else cfg.lora_dropout

    def pass_over(batch: list) -> float:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        start = time.perf_counter()
        for pair in batch:
            step(collate_pairs([pair], tok.pad_token_id), loss_scale=1 / len(batch))
        return time.perf_counter() - start

    times: dict[str, list[float]] = {v: [] for v in variants}
    for variant in variants:  # warm-up: each variant's kernels for these shapes
        use(variant)
        pass_over(pairs[:2])
    for round_ in range(rounds):
        for variant in variants:
            use(variant)
            times[variant].append(pass_over(pairs[2:10]))
            print(f"round {round_} {variant}: {times[variant][-1]:.2f} s", flush=True)
    for variant, seconds in times.items():
        print(f"{variant}: min {min(seconds):.2f} s, mean {sum(seconds) / len(seconds):.2f} s per 8 pairs")


if __name__ == "__main__":
    main(sys.argv[1].split(","), int(sys.argv[2]) if len(sys.argv) > 2 else 2)
