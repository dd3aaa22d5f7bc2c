"""One micro-batch of ORPO: forward, loss and backward. No file I/O, no optimizer.

Three ways to get the same gradient (``--step``):

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

* ``auto`` (the default in training): ``sequential`` for a micro-batch whose two sides
  fit the memory budget by the analytic floor, else ``split`` (``step_choice.py``).

In every mode the log-probs come from :func:`chunked_token_logps`: the ``lm_head`` runs on
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
from torch.utils.checkpoint import checkpoint

from ..data.collate import IGNORE_INDEX, PairBatch, SideBatch, concat_sides
from .loss import orpo_logp_grads, orpo_loss, sequence_logps

STEP_MODES = ("split", "sequential", "joint", "auto")


class _GivenHidden(nn.Module):
    """Stands in for the decoder: returns the hidden states it was handed."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden

    def forward(self, *args, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPast

        return BaseModelOutputWithPast(last_hidden_state=self.hidden)


class OutputHead:
    """The model's own path from final hidden states to logits, ``(n, H) -> (n, V)``.

    Some families transform the ``lm_head`` output in their ``ForCausalLM.forward``:
    Gemma-2 soft-caps it (``final_logit_softcapping``), Cohere multiplies by
    ``logit_scale``, Granite divides by ``logits_scaling``. Rather than keep a list of such
    names, the head runs the model's own forward with its decoder swapped for a module
    that returns the given hidden states, so whatever that forward does after the
    decoder is applied, exactly. Models whose decoder is not a direct child fall back to
    the bare ``lm_head``.
    """

    def __init__(self, model: nn.Module):
        self.base = model.get_base_model() if hasattr(model, "get_base_model") else model
        decoder = self.base.get_decoder()
        self.decoder_name = next((n for n, c in self.base.named_children() if c is decoder), None)
        self.lm_head = self.base.get_output_embeddings()

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.decoder_name is None:
            return self.lm_head(hidden)
        modules = self.base._modules  # swapped without __setattr__'s checks, restored below
        decoder = modules[self.decoder_name]
        modules[self.decoder_name] = _GivenHidden(hidden.unsqueeze(0))
        try:
            positions = torch.zeros((1, hidden.shape[0]), dtype=torch.long, device=hidden.device)
            out = self.base(input_ids=positions, use_cache=False, logits_to_keep=0)
        finally:
            modules[self.decoder_name] = decoder
        return out.logits[0]


def _chunk_token_logps(hidden: torch.Tensor, targets: torch.Tensor, head: Callable) -> torch.Tensor:
    """log P(target) for ``hidden (n, H)`` and ``targets (n,)``; logits ``(n, V)`` live only here."""
    logits = head(hidden).float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


class _FusedChunkLogps(torch.autograd.Function):
    """A chunk's log-probs whose gradient w.r.t. the hidden states is computed in the forward.

    For a frozen head, the backward needs only ``d logp_i / d h_i`` per row (a row's log-prob
    depends on that row's hidden state alone), so the forward computes it while the logits
    exist and keeps that ``(n, H)`` tensor instead of recomputing the ``(n, V)`` logits in
    the backward, as Liger-Kernel's fused linear losses do. The backward scales each row
    by its incoming gradient. Only valid when no head parameter needs a gradient (LoRA on
    the ``lm_head`` takes the checkpointed path).
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, targets: torch.Tensor, head: Callable) -> torch.Tensor:
        with torch.enable_grad():
            leaf = hidden.detach().requires_grad_()
            logps = _chunk_token_logps(leaf, targets, head)
            (grad_hidden,) = torch.autograd.grad(logps.sum(), leaf)
        ctx.save_for_backward(grad_hidden)
        return logps.detach()

    @staticmethod
    def backward(ctx, grad_logps: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        return grad_logps.unsqueeze(-1).to(grad_hidden.dtype) * grad_hidden, None, None


def head_is_frozen(head: Callable) -> bool:
    """True when no parameter of the head (its ``lm_head``, or the module itself) needs a gradient."""
    module = getattr(head, "lm_head", head)
    return isinstance(module, nn.Module) and not any(p.requires_grad for p in module.parameters())


def chunked_token_logps(
    hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], labels: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """Per-token log-probs of the labels, computed a chunk of scored positions at a time.

    Args:
        hidden: ``(batch, seq, hidden)`` final hidden states, aligned with the inputs.
        head: ``(n, hidden) -> (n, vocab)`` logits, e.g. :class:`OutputHead` or an ``lm_head``
            (frozen or LoRA-wrapped; gradients flow through it).
        labels: ``(batch, seq)`` input-aligned labels, ``IGNORE_INDEX`` where not scored.
        chunk_size: scored positions per ``head`` call.

    Returns:
        ``(batch, seq - 1)`` log P(labels[:, 1:]) (position t predicts token t+1), float32,
        zero where not scored: feed it to ``loss.sequence_logps`` with ``labels[:, 1:]``.

    Only scored positions reach the head (prompt and padding cost nothing), and a chunk's
    ``(chunk, vocab)`` logits are freed after its forward, so logits memory is one chunk,
    not sequence x vocabulary. With a frozen head the chunk's gradient w.r.t. the hidden
    states is computed right then (:class:`_FusedChunkLogps`, no recomputation); with a
    trainable head (LoRA on ``lm_head``) the chunk is checkpointed and recomputed in the
    backward.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    scored_hidden = hidden[:, :-1][mask]  # (n_scored, H)
    scored_targets = targets[mask]  # (n_scored,)
    pieces = []
    fused = head_is_frozen(head)
    for start in range(0, scored_targets.numel(), chunk_size):
        h = scored_hidden[start : start + chunk_size]
        t = scored_targets[start : start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad and fused:
            pieces.append(_FusedChunkLogps.apply(h, t, head))
        elif torch.is_grad_enabled() and h.requires_grad:
            pieces.append(checkpoint(_chunk_token_logps, h, t, head, use_reentrant=False))
        else:
            pieces.append(_chunk_token_logps(h, t, head))
    flat = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)
    return torch.zeros(targets.shape, dtype=flat.dtype, device=flat.device).masked_scatter(mask, flat)


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

    def forward(self, side: SideBatch) -> tuple[torch.Tensor, torch.Tensor]:
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
    ):
        if mode not in STEP_MODES:
            raise ValueError(f"step mode {mode!r} is not one of {', '.join(STEP_MODES)}")
        self.model, self.beta, self.mode, self.chunk_size = model, beta, mode, chunk_size
        self.nll_over_prompt, self.pad_token_id = nll_over_prompt, pad_token_id
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
        run = {"split": self._split, "sequential": self._sequential, "joint": self._joint}[mode]
        loss, metrics = run(batch, loss_scale)
        tokens = batch.chosen.num_tokens + batch.rejected.num_tokens
        return StepOutput(loss.detach(), metrics, tokens, batch.rows)

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

