"""One micro-batch of ORPO: forward, loss and backward. No file I/O, no optimizer.

Four ways to get the same gradient (``--step``):

* ``split`` (default): only one side's activations are alive at a time. The ORPO loss
  ``L = NLL_w + beta * L_OR(logp_w, logp_l)`` depends on the rejected pass only through the
  per-sequence scalar ``logp_l``. So:

  (a) a no-grad forward of the rejected responses gives ``logp_l``;
  (b) a grad forward of the chosen responses, backward of ``NLL_w + beta * L_OR(logp_w, logp_l.detach())``;
  (c) a grad forward of the rejected responses, backward of ``(dL/dlogp_l).detach() * logp_l``
      with the coefficient in closed form (``loss.orpo_logp_grads``), since by the chain rule
      that term's gradient is exactly dL/dlogp_l * dlogp_l/dθ.

  The price is one extra no-grad forward of the rejected side. With LoRA dropout on, (a) and
  (c) must draw the same dropout mask, or (c) differentiates a different function from the
  one that gave ``logp_l``: the RNG state is captured before (a) and restored for (c).

* ``sequential``: chosen then rejected forward with grad, both graphs held, one backward.
  No extra forward, but two sequences' checkpointed activations are alive at once.

* ``joint``: chosen and rejected concatenated into one padded batch, one forward, one
  backward, as TRL does. Peak memory holds both sides padded to the longer one.

* ``shared``: each pair laid out once as ``[prompt | chosen | rejected]``, several pairs
  packed per row up to ``pack_tokens`` (``data/packing.py``), one forward with a mask that
  keeps pairs and the two replies apart (``shared.py``), one backward. The prompt runs once
  instead of twice and the matrices see every pair of the micro-batch at once, unpadded.
  LoRA dropout draws one mask per token, so both replies see the same mask on the prompt.

* ``auto`` (the default in training): ``sequential`` for a micro-batch whose two sides
  fit the memory budget by the analytic floor, else ``split`` (``step_choice.py``).

In every mode the log-probs come from ``head.py`` (:func:`chunked_token_logps`): the ``lm_head`` runs on
``logits_chunk_size`` scored positions at a time inside a checkpoint, so full
sequence x vocabulary logits never exist, in the forward or the backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn

from ..data.collate import PairBatch, SideBatch, concat_sides
from ..data.packing import SharedBatch, pack_shared
from ..models.plan import AUTO_MODES  # --step auto's choices, fastest and hungriest first
from .head import OutputHead, chunked_token_logps
from .loss import orpo_logp_grads, orpo_loss, sequence_logps
from .shared import shared_logps

STEP_MODES = ("split", "sequential", "joint", "shared", "auto")
LEANER_MODE = dict(zip(AUTO_MODES[:-1], AUTO_MODES[1:], strict=True))  # its retry after an out-of-memory error


@dataclass
class SideLogps:
    """Per-sequence results of one forward: ``logps`` and ``nll``, each ``(batch,)``."""

    logps: torch.Tensor
    nll: torch.Tensor


def forward_logps(model: nn.Module, side: SideBatch, chunk_size: int, nll_over_prompt: bool = False) -> SideLogps:
    """Forward one side and return its mean response log-probs and its NLL.

    ``logps`` is the mean log-prob over response tokens (ORPO's length-normalised P(y|x)).
    ``nll`` is ``-logps`` (response only, the default), or the mean NLL over prompt and
    response tokens when ``nll_over_prompt`` (the official ORPO code and TRL).
    """
    head = OutputHead(model)
    decoder = head.base.get_decoder()
    hidden = decoder(input_ids=side.input_ids, attention_mask=side.attention_mask, use_cache=False).last_hidden_state
    scored = side.prompt_labels if nll_over_prompt else side.labels
    token_logps = chunked_token_logps(hidden, head, scored, chunk_size)
    logps = sequence_logps(token_logps, side.labels[:, 1:])
    nll = -sequence_logps(token_logps, scored[:, 1:]) if nll_over_prompt else -logps
    return SideLogps(logps, nll)


class SideForward(nn.Module):
    """:func:`forward_logps` as a module, so a data-parallel engine can wrap it.

    DDP and FSDP2 act through a module's ``forward`` (DDP arms its gradient bookkeeping
    there, FSDP2 gathers the sharded weights); the step's passes call this module, whose
    parameters are the model's.
    """

    def __init__(self, model: nn.Module, chunk_size: int = 64, nll_over_prompt: bool = False):
        super().__init__()
        self.model, self.chunk_size, self.nll_over_prompt = model, chunk_size, nll_over_prompt

    def forward(self, side: SideBatch | SharedBatch) -> tuple[torch.Tensor, ...]:
        """``(logps, nll)`` of one side; for a :class:`SharedBatch`, ``(chosen_logps, rejected_logps, chosen_nll)``."""
        if isinstance(side, SharedBatch):
            return shared_logps(self.model, side, self.chunk_size, self.nll_over_prompt)
        out = forward_logps(self.model, side, self.chunk_size, self.nll_over_prompt)
        return out.logps, out.nll


def _capture_rng(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda_state


def _restore_rng(device: torch.device, state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


@dataclass
class StepOutput:
    """What one micro-batch reports: the (unscaled) loss and metrics, detached; token count."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]
    num_tokens: int
    rows: list[int]


def _default_backward(loss: torch.Tensor) -> None:
    loss.backward()


class OrpoStep:
    """Runs forward and backward of one micro-batch in the chosen mode.

    Device placement and backward live here and only here. A data-parallel engine
    (``distributed.py``) passes its wrapped ``forward`` (a :class:`SideForward` under DDP or
    FSDP2) and its ``no_sync``: then every forward+backward pass keeps its gradients local
    except the micro-batch's last pass when ``sync_grads`` is set, whose backward averages
    the accumulated gradients over the ranks.
    """

    def __init__(
        self,
        model: nn.Module,
        beta: float,
        mode: str = "split",
        chunk_size: int = 64,
        nll_over_prompt: bool = False,
        pad_token_id: int = 0,
        device: torch.device | str = "cpu",
        backward: Callable[[torch.Tensor], None] = _default_backward,
        choose: Callable[[PairBatch], str] | None = None,
        forward: nn.Module | None = None,
        no_sync: Callable[[], AbstractContextManager] | None = None,
        pack_tokens: int = 0,
        pad_to_multiple_of: int = 1,
    ):
        if mode not in STEP_MODES:
            raise ValueError(f"step mode {mode!r} is not one of {', '.join(STEP_MODES)}")
        self.model, self.beta, self.mode, self.chunk_size = model, beta, mode, chunk_size
        self.nll_over_prompt, self.pad_token_id = nll_over_prompt, pad_token_id
        self.pack_tokens, self.pad_to_multiple_of = pack_tokens, pad_to_multiple_of  # the shared layout's rows
        self.device = torch.device(device)
        self.backward = backward
        if mode == "auto" and choose is None:
            raise ValueError("step mode 'auto' needs a chooser (step_choice.StepChooser)")
        self.choose = choose
        self.side_forward = forward if forward is not None else SideForward(model, chunk_size, nll_over_prompt)
        self.no_sync = no_sync
        self._sync_grads = True

    def __call__(self, batch: PairBatch, loss_scale: float = 1.0, sync_grads: bool = True) -> StepOutput:
        """Accumulate ``loss_scale * dL/dθ`` into the parameters' ``.grad``; L is the batch-mean ORPO loss.

        ``sync_grads``: under a data-parallel engine, whether this micro-batch's last backward
        averages the gradients over the ranks (the last micro-batch of an optimizer step).
        """
        self._sync_grads = sync_grads
        batch = batch.to(self.device)
        mode = self.choose(batch) if self.mode == "auto" else self.mode
        if self.mode == "auto" and not torch.distributed.is_initialized():
            loss, metrics = self._retrying_leaner(batch, loss_scale, mode)
        else:
            loss, metrics = self._run(mode, batch, loss_scale)
        tokens = batch.chosen.num_tokens + batch.rejected.num_tokens
        return StepOutput(loss.detach(), metrics, tokens, batch.rows)

    def _run(self, mode: str, batch: PairBatch, scale: float):
        run = {"split": self._split, "sequential": self._sequential, "joint": self._joint, "shared": self._shared}[mode]
        return run(batch, scale)

    def _retrying_leaner(self, batch: PairBatch, scale: float, mode: str):
        """``--step auto``: on an out-of-memory error, the same micro-batch again in the next leaner mode.

        The micro-batch's gradients go into fresh ``.grad`` tensors and are added to the ones
        accumulated so far only when it succeeds, so a pass that fails halfway through its
        backward leaves nothing behind (the price: one extra copy of the LoRA gradients). The
        chooser remembers the failure and never picks the richer mode again. One process only:
        a rank retrying alone would leave the others waiting in a collective.
        """
        params = [p for p in self.model.parameters() if p.requires_grad]
        while True:
            held = [p.grad for p in params]
            for p in params:
                p.grad = None
            try:
                result = self._run(mode, batch, scale)
            except torch.OutOfMemoryError:
                for p, grad in zip(params, held, strict=True):
                    p.grad = grad
                leaner = LEANER_MODE.get(mode)
                if leaner is None:
                    raise
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()  # the failed pass's blocks back to the device
                getattr(self.choose, "demote", lambda *_: None)(mode, leaner)
                mode = leaner
                continue
            for p, grad in zip(params, held, strict=True):
                if grad is not None:
                    p.grad = grad if p.grad is None else p.grad.add_(grad)
            return result

    def _forward(self, side: SideBatch) -> SideLogps:
        return SideLogps(*self.side_forward(side))

    def _pass(self, last: bool) -> AbstractContextManager:
        """The context of one forward+backward pass: gradients stay local unless it is the step's last."""
        if self.no_sync is None or (last and self._sync_grads):
            return contextlib.nullcontext()
        return self.no_sync()

    def _split(self, batch: PairBatch, scale: float):
        rejected_rng = _capture_rng(self.device)
        with torch.no_grad():  # a no-grad forward leaves DDP's gradient bookkeeping untouched
            rejected_logps = self._forward(batch.rejected).logps  # (a)
        with self._pass(last=False):
            chosen = self._forward(batch.chosen)  # (b)
            loss, metrics = orpo_loss(chosen.logps, rejected_logps, chosen.nll, self.beta)
            self.backward(loss * scale)
        _, d_rejected = orpo_logp_grads(chosen.logps, rejected_logps, self.beta)
        after_chosen_rng = _capture_rng(self.device)
        _restore_rng(self.device, rejected_rng)  # the same dropout mask as (a)
        with self._pass(last=True):
            rejected = self._forward(batch.rejected)  # (c)
            self.backward((d_rejected * scale * rejected.logps).sum())
        _restore_rng(self.device, after_chosen_rng)
        return loss, metrics

    def _sequential(self, batch: PairBatch, scale: float):
        with self._pass(last=True):
            chosen = self._forward(batch.chosen)
            rejected = self._forward(batch.rejected)
            loss, metrics = orpo_loss(chosen.logps, rejected.logps, chosen.nll, self.beta)
            self.backward(loss * scale)
        return loss, metrics

    def _joint(self, batch: PairBatch, scale: float):
        with self._pass(last=True):
            both = self._forward(concat_sides(batch, self.pad_token_id))
            n = batch.size
            loss, metrics = orpo_loss(both.logps[:n], both.logps[n:], both.nll[:n], self.beta)
            self.backward(loss * scale)
        return loss, metrics

    def _shared(self, batch: PairBatch, scale: float):
        if not batch.pairs:
            raise ValueError("step mode 'shared' needs the batch's pairs (collate.collate_pairs keeps them)")
        shared = pack_shared(batch.pairs, self.pad_token_id, self.pack_tokens, self.pad_to_multiple_of).to(self.device)
        with self._pass(last=True):
            chosen_logps, rejected_logps, chosen_nll = self.side_forward(shared)
            loss, metrics = orpo_loss(chosen_logps, rejected_logps, chosen_nll, self.beta)
            self.backward(loss * scale)
        return loss, metrics
