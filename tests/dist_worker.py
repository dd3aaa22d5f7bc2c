"""Run by ``torchrun`` in tests/test_distributed.py: one rank of a training run.

``python dist_worker.py CONFIG.json OUT_DIR [--resume] [--stop-after N]``: trains with the
config, writes this rank's LoRA weights (whole, also under FSDP2) after every optimizer step
to ``OUT_DIR/rank{R}-step{S}.safetensors`` with the number of gradient all-reduces DDP ran
so far (``__allreduces``: completed reductions of all buckets; 0 under FSDP2) and, with
``--stop-after``, raises KeyboardInterrupt after step N as a Ctrl-C would. With
``--sigint-at N`` rank 0 sends SIGINT to torchrun 0.1 s after step N's end (inside the next
step's forwards and backwards), as a Ctrl-C in its terminal does: torchrun passes it on to
every rank, each at its own moment.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

import torch
from safetensors.torch import save_file

import qlora_orpo.training.distributed as distributed
import qlora_orpo.training.step as step
from qlora_orpo.config import OrpoConfig
from qlora_orpo.recipes.finetune import run


def main(argv: list[str]) -> int:
    config, out = json.loads(Path(argv[0]).read_text()), Path(argv[1])
    stop_after = int(argv[argv.index("--stop-after") + 1]) if "--stop-after" in argv else 0
    sigint_at = int(argv[argv.index("--sigint-at") + 1]) if "--sigint-at" in argv else 0
    models = []
    real_init = step.OrpoStep.__init__

    def capturing_init(self, model, *args, **kwargs):  # the loop's model, to read its weights
        models.append(model)
        real_init(self, model, *args, **kwargs)

    step.OrpoStep.__init__ = capturing_init
    allreduces = [0]
    real_wrap = distributed.wrap_ddp

    def counting_wrap(module, device):  # counts DDP's gradient reductions through a comm hook
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def hook(state, bucket):
            allreduces[0] += bucket.is_last()
            return allreduce_hook(state, bucket)

        ddp = real_wrap(module, device)
        ddp.register_comm_hook(None, hook)
        return ddp

    distributed.wrap_ddp = counting_wrap
    rank = int(os.environ.get("RANK", "0"))

    def dump(s: int) -> None:
        # Under FSDP2 each rank holds a slice: gathered whole (a collective; every rank dumps).
        weights = {n: distributed.full_value(p.detach()).clone() for n, p in models[-1].named_parameters()
                   if p.requires_grad}
        weights["__allreduces"] = torch.tensor(allreduces[0])
        save_file(weights, str(out / f"rank{rank}-step{s}.safetensors"))
        if s == stop_after:
            raise KeyboardInterrupt
        if s == sigint_at and rank == 0:
            threading.Timer(0.1, os.kill, (os.getppid(), signal.SIGINT)).start()

    try:
        run(OrpoConfig(**config), resume="--resume" in argv, on_step_end=dump)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
