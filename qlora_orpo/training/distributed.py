"""Data-parallel (DDP) and sharded (FSDP2) training on torch.distributed: launch, wrapping, I/O.

The engine is torch's own: ``torchrun --nproc_per_node N`` or ``accelerate launch
--multi_gpu --num_processes N`` start the processes and set ``WORLD_SIZE``/``RANK``/
``LOCAL_RANK``; this module joins the process group (gloo on the CPU, nccl on CUDA), wraps
the per-side forward in ``DistributedDataParallel`` (or shards it with ``fully_shard``),
and says which rank writes files. Nothing here is a home-made collective algorithm: the
gradient averaging is DDP's (or FSDP2's reduce-scatter).

Under FSDP2 no rank holds the whole weights, so what reads them whole is collective and runs
on every rank: checkpoints and the final adapter gather full state dicts
(``sharded_state.py``; rank 0 writes them in the single-process format), and evaluation runs
on every rank (``evaluation/run_evaluator.py``). Under DDP rank 0 alone does both. Every rank must also run
the same passes: ``--step auto``'s per-micro-batch choice and a Ctrl-C are agreed first.

Gradient synchronisation happens once per optimizer step: every forward+backward pass
runs under ``no_sync`` except the last pass of the last micro-batch (the split step has two
per micro-batch), whose backward all-reduces the accumulated gradients. DDP's bookkeeping
is armed by a forward with grad enabled outside ``no_sync``, so the forward of that last
pass must also run outside it, which is why the context covers forward and backward.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
from torch import nn

from ..core.errors import UserError
from ..core.launcher import collective_device, sharding_from_env

DEFAULT_COLLECTIVE_TIMEOUT_S = 4 * 3600  # see collective_timeout


def _accelerate_single_process_request() -> int:
    """The ``--num_processes`` of an ``accelerate launch`` that started this one process (0: none).

    ``accelerate launch --cpu --num_processes N`` uses its "simple" launcher, which starts a
    single ordinary process: no ``WORLD_SIZE``, only ``ACCELERATE_*`` variables. The number
    asked for is only on the launcher's command line, i.e. the parent process's.
    """
    if "WORLD_SIZE" in os.environ or "ACCELERATE_MIXED_PRECISION" not in os.environ:
        return 0
    try:
        argv = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:  # not Linux: nothing to check against
        return 0
    for flag in ("--num_processes", "--num-processes"):
        for i, arg in enumerate(argv):
            value = argv[i + 1] if arg == flag and i + 1 < len(argv) else arg.partition("=")[2]
            if (arg == flag or arg.startswith(flag + "=")) and value.isdigit():
                return int(value)
    return 0


@dataclass
class Dist:
    """This process's place in the run; ``world_size == 1`` means a plain single-process run."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    sharding: str = "ddp"
    _sigint: bool = field(default=False, init=False, repr=False)  # Ctrl-C held by interrupts_at_micro_batch_ends

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """FSDP2 over several ranks: reading the weights whole is a collective (every rank takes part)."""
        return self.enabled and self.sharding == "fsdp2"

    def check_export(self, export: str) -> None:
        """Refuse ``--export`` in a sharded run: merging needs the whole base in one process."""
        if self.sharded and export != "none":
            raise UserError(f"--export {export}: merging needs the whole base in one process, which a sharded "
                            f"(fsdp2) run has nowhere; train with --export none, then run `qlora-orpo export "
                            f"--adapter RUN_DIR/adapter --out OUT --format {export}`")

    def check_loss_scaling(self, enabled: bool) -> None:
        """Refuse float16 loss scaling in a sharded run: untested there, and its overflow check must see every shard.

        ``GradScaler`` skips a step when a gradient overflowed; under FSDP2 each rank holds a
        slice of the gradients, and a step skipped on some ranks only would split the weights.
        FSDP1 needed a ``ShardedGradScaler`` (an all-reduce of the overflow flag) for this.
        """
        if self.sharded and enabled:
            raise UserError("fsdp2 with float16 compute: loss scaling is not supported in a sharded run; use "
                            "--compute-dtype bfloat16 (Ampere or newer GPUs) or data-parallel (DDP)")

    def seed_step(self, seed: int, step: int) -> None:
        """Seed dropout from (seed, rank, step) under several ranks.

        Each rank needs its own dropout masks, and a resumed run (under any number of
        ranks) must draw the same ones again without per-rank RNG files in the checkpoint.
        """
        if self.enabled:
            torch.manual_seed((seed * 1_000_003 + self.rank) * 1_000_003 + step)

    def reduce_step(self, tokens: int, means: dict[str, torch.Tensor]) -> tuple[int, dict[str, torch.Tensor]]:
        """An optimizer step's token count summed and its metrics averaged over the ranks (equal batch sizes)."""
        if not self.enabled:
            return tokens, means
        totals = self.sum_values({**means, "__tokens": float(tokens)})
        return int(totals.pop("__tokens")), {k: v / self.world_size for k, v in totals.items()}

    @contextlib.contextmanager
    def interrupts_at_micro_batch_ends(self) -> Iterator[None]:
        """Under FSDP2, hold Ctrl-C until :meth:`interrupted`, where every rank stops at the same point.

        Each FSDP2 forward and backward is a collective (each layer's weights are gathered
        from every rank), and so is the checkpoint that an interrupt saves. torchrun hands
        SIGINT to each rank at its own moment; a rank that stopped where the signal landed
        would leave the others waiting in a collective it never joins. Here the signal only
        sets a flag. Under DDP and in one process Ctrl-C raises where it lands, as before.
        """
        if not self.sharded or threading.current_thread() is not threading.main_thread():
            yield
            return

        def hold(signum: int, frame: object) -> None:
            self._sigint = True

        previous = signal.signal(signal.SIGINT, hold)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def interrupted(self) -> bool:
        """Whether any rank holds a Ctrl-C (a small all-reduce under FSDP2; False otherwise)."""
        return self.sharded and bool(self.sum_values({"sigint": float(self._sigint)})["sigint"] > 0)

    # -- collectives (no-ops in a single process) ---------------------------------------------

    def agree_on_step_mode(self, mode: str) -> str:
        """The step mode every rank runs under FSDP2: the leanest any rank chose (``--step auto``).

        Ranks choose per micro-batch from their own batch's length; the modes run different
        numbers of forward and backward passes, and under FSDP2 each pass is a collective.
        """
        if not self.sharded:
            return mode
        order = ("split", "shared", "sequential", "joint")  # by peak memory
        choice = torch.tensor([order.index(mode)], dtype=torch.long, device=collective_device())
        torch.distributed.all_reduce(choice, op=torch.distributed.ReduceOp.MIN)
        return order[int(choice.item())]

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def broadcast_text(self, text: str) -> str:
        """Rank 0's ``text`` on every rank (a uint8 tensor: no pickling, unlike broadcast_object_list)."""
        if not self.enabled:
            return text
        device = collective_device()
        data = torch.tensor(list(text.encode()), dtype=torch.uint8, device=device)
        length = torch.tensor([data.numel()], dtype=torch.long, device=device)
        torch.distributed.broadcast(length, 0)
        buffer = data if self.is_main else torch.empty(int(length), dtype=torch.uint8, device=device)
        torch.distributed.broadcast(buffer, 0)
        return bytes(buffer.cpu().tolist()).decode()

    def sum_values(self, values: dict[str, torch.Tensor | float]) -> dict[str, torch.Tensor]:
        """Each value summed over the ranks, in one all-reduce of a small float64 vector."""
        keys = list(values)
        device = collective_device()
        stacked = torch.stack([torch.as_tensor(values[k], dtype=torch.float64).reshape(()).to(device) for k in keys])
        if self.enabled:
            torch.distributed.all_reduce(stacked)
        return dict(zip(keys, stacked.cpu().unbind(), strict=True))

    def shutdown(self) -> None:
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    # -- wrapping ---------------------------------------------------------------------------

    def wrap(self, module: nn.Module, device: torch.device) -> nn.Module:
        """``module`` as the rank's engine runs it: itself, DDP, or FSDP2-sharded."""
        if not self.enabled:
            return module
        if self.sharding == "fsdp2":
            return shard_fsdp2(module, device)
        return wrap_ddp(module, device)

    def no_sync(self, wrapped: nn.Module) -> Callable[[], AbstractContextManager] | None:
        """The context that keeps a pass's gradients local (accumulated, not yet averaged)."""
        if not self.enabled:
            return None
        if isinstance(wrapped, nn.parallel.DistributedDataParallel):
            return wrapped.no_sync
        return lambda: _fsdp2_no_sync(wrapped)


def is_main_process() -> bool:
    """Rank 0 (or a single process): the one that prints and writes files."""
    return int(os.environ.get("RANK", "0")) == 0


class NullLog:
    """The metrics logger (``metrics.MetricsLogger``'s interface) of the ranks that write nothing."""

    def log(self, record: dict, postfix: str | None = None) -> None:
        pass

    def console(self, message: str) -> None:
        pass

    def start_progress(self, total: int, initial: int = 0, desc: str = "training") -> None:
        pass

    def advance(self, steps: int = 1) -> None:
        pass

    def close_progress(self) -> None:
        pass

    def close(self) -> None:
        pass


def init(device: torch.device) -> Dist:
    """Join the process group a launcher set up, or return the single-process context.

    Raises UserError when ``accelerate launch`` asked for several processes but started one
    (its ``--cpu`` launcher does that silently).
    """
    asked = _accelerate_single_process_request()
    if asked > 1:
        raise UserError(
            f"accelerate launch asked for {asked} processes but started one non-distributed process "
            f"(its --cpu launcher ignores --num_processes); use `accelerate launch --multi_gpu --num_processes "
            f"{asked}` or `torchrun --nproc_per_node {asked}`"
        )
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    sharding = sharding_from_env()
    if sharding == "fsdp2" and os.environ.get("FSDP_VERSION", "1") != "2":
        raise UserError("FSDP1 cannot flatten 4-bit weights with LoRA here; set fsdp_version: 2 in the accelerate config")
    dist = Dist(world_size, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), sharding)
    if not dist.enabled or torch.distributed.is_initialized():
        return dist
    if device.type == "cuda":
        torch.cuda.set_device(dist.local_rank)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=collective_timeout())
    return dist


def collective_timeout() -> timedelta:
    """How long a rank waits in a collective: ``QLORA_ORPO_COLLECTIVE_TIMEOUT_S`` seconds, 4 hours by default.

    Under DDP rank 0 alone evaluates, selects the best checkpoint and exports (a merged
    export or a GGUF file of a large model takes many minutes) while the other ranks wait in
    the next barrier. The backends' own default (10 minutes for NCCL) would kill such a run,
    so the wait is set explicitly, and long.
    """
    raw = os.environ.get("QLORA_ORPO_COLLECTIVE_TIMEOUT_S", "")
    try:
        seconds = float(raw) if raw else DEFAULT_COLLECTIVE_TIMEOUT_S
    except ValueError:
        raise UserError(f"QLORA_ORPO_COLLECTIVE_TIMEOUT_S: {raw!r} is not a number of seconds") from None
    if seconds <= 0:
        raise UserError(f"QLORA_ORPO_COLLECTIVE_TIMEOUT_S: {raw!r} must be positive")
    return timedelta(seconds=seconds)


def wrap_ddp(module: nn.Module, device: torch.device) -> nn.parallel.DistributedDataParallel:
    """DDP over the trainable parameters only.

    The frozen (4-bit) base is identical on every rank by construction (same file, same
    deterministic quantisation), so it is not broadcast at wrap time: only the LoRA weights
    are, which also guarantees they start equal. ``find_unused_parameters=False``: every
    LoRA weight is used by every synchronised pass, and use_reentrant=False checkpointing
    (models/loader.py) is what DDP supports without it.
    """
    frozen = [name for name, p in module.named_parameters() if not p.requires_grad]
    frozen += [name for name, _ in module.named_buffers()]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen)
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        module, device_ids=device_ids, find_unused_parameters=False, broadcast_buffers=False
    )


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor of ``tensor``'s whole value: ``clip_grad_norm_`` over FSDP2's DTensor gradients returns a DTensor."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def decoder_layers(module: nn.Module) -> list[nn.Module]:
    """The decoder's transformer blocks (the units FSDP2 shards one at a time)."""
    for sub in module.modules():
        layers = getattr(sub, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) and hasattr(sub, "embed_tokens"):
            return list(layers)
    raise UserError("fsdp2: no decoder layers (a ModuleList `layers` beside `embed_tokens`) found in this model")


def shard_fsdp2(module: nn.Module, device: torch.device) -> nn.Module:
    """``fully_shard`` each decoder layer, then the root, as peft's FSDP-QLoRA recipe does.

    The 4-bit weights must be stored in a float dtype (``bnb_4bit_quant_storage`` equal to
    the compute dtype, model.load_base's ``quant_storage``) so all of a layer's parameters
    can be flattened into one sharded buffer; uint8 storage cannot be mixed with the float
    LoRA weights. The mesh is one dimension over all ranks, on the rank's device type.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    # A base loaded by rank 0 alone (models/rank0_load.py): the other ranks hold a meta skeleton.
    skeleton = torch.tensor([any(p.is_meta for p in module.parameters())], device=collective_device())
    torch.distributed.all_reduce(skeleton, op=torch.distributed.ReduceOp.MAX)
    from_rank0 = bool(skeleton.item())
    rank0_values = {}
    if from_rank0 and torch.distributed.get_rank() == 0:
        # The whole weights, until each rank has taken its shard (fully_shard moves the
        # parameters' storage to the device; these references keep rank 0's loaded copy).
        # Plain tensors: a bitsandbytes Params4bit's own .to() would also move its quant state.
        rank0_values = {name: p.detach().as_subclass(torch.Tensor) for name, p in module.named_parameters()}
    for layer in module.modules():  # bitsandbytes' quant states: not parameters, never sharded
        state = getattr(layer, "quant_state", None)
        if state is not None and hasattr(state, "absmax"):
            state.to(device)
    for layer in decoder_layers(module):
        fully_shard(layer, mesh=mesh)
    fully_shard(module, mesh=mesh)
    if from_rank0:
        _fill_from_rank0(module, rank0_values, device)
    return module


def _fill_from_rank0(module: nn.Module, rank0_values: dict[str, torch.Tensor], device: torch.device) -> None:
    """Give every rank its shard of rank 0's weights and rank 0's buffers, one tensor at a time.

    Ranks with a meta skeleton first allocate their shards (``to_empty``); rank 0 scatters each
    parameter (``distribute_tensor`` from rank 0: a rank never holds more than one whole tensor)
    and broadcasts each buffer (rotary frequencies and the like, computed on the meta device
    there).
    """
    from torch.distributed.tensor import distribute_tensor

    if any(p.is_meta for p in module.parameters()) or any(b.is_meta for b in module.buffers()):
        module.to_empty(device=device)
    rank = torch.distributed.get_rank()
    with torch.no_grad():
        for name, param in module.named_parameters():
            whole = (rank0_values.pop(name).to(device) if rank == 0
                     else torch.empty(param.shape, dtype=param.dtype, device=device))
            if hasattr(param, "device_mesh"):  # a DTensor: this rank keeps its shard
                shard = distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=0)
                param.to_local().copy_(shard.to_local())
            else:
                torch.distributed.broadcast(whole, src=0)
                param.copy_(whole)
        for buffer in module.buffers():
            torch.distributed.broadcast(buffer, src=0)


@contextlib.contextmanager
def _fsdp2_no_sync(module: nn.Module) -> Iterator[None]:
    """FSDP2's no_sync: unsharded gradients accumulate locally, reduce-scatter skipped."""
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)

