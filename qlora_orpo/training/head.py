"""From final hidden states to log-probs through the model's own output head, a chunk at a time.

Full sequence x vocabulary logits never exist, in the forward or the backward: only scored
positions reach the head, ``chunk_size`` of them per call (:func:`scored_logps`). Used by
every step mode (``step.py``, ``shared.py``) and by evaluation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..data.collate import IGNORE_INDEX


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
    flat = scored_logps(hidden[:, :-1][mask], targets[mask], head, chunk_size)
    return torch.zeros(targets.shape, dtype=flat.dtype, device=flat.device).masked_scatter(mask, flat)


def scored_logps(
    scored_hidden: torch.Tensor, scored_targets: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
    chunk_size: int,
) -> torch.Tensor:
    """log P(target) for ``scored_hidden (n, H)`` and ``scored_targets (n,)``, ``chunk_size`` rows per head call.

    Returns ``(n,)`` float32. See :func:`chunked_token_logps` for the memory and gradient paths.
    """
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
    return torch.cat(pieces) if pieces else scored_hidden.new_zeros(0, dtype=torch.float32)
