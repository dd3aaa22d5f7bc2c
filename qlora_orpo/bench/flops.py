"""The analytic FLOPs of one ORPO training step, and its roofline time on this machine's matmul rate.

Matmuls only (a multiply-add counts 2 FLOPs); norms, activations, softmax, dequantisation
and the AdamW update are elementwise and left out. For a Llama-style decoder (:class:`ModelShape`:
``N`` layers, hidden ``H``, ``h`` heads of width ``d``, vocabulary ``V``), LoRA rank ``r`` on
the adapted linears, one sequence of ``S`` tokens of which ``c`` positions reach the ``lm_head``:

* linear layers, per layer: ``Lin = 2 * S * sum(in * out)`` over q, k, v, o, gate, up, down;
* LoRA, per layer: ``Lora = 2 * S * r * sum(in + out)`` over the adapted linears (A then B);
* causal attention, per layer: ``Att = 2 * h * d * S * (S + 1)`` -- ``Q K^T`` and ``P V``, each
  ``2 * h * d`` per (query, key) pair over the ``S * (S + 1) / 2`` pairs of the lower triangle
  (what an ideal causal kernel computes);
* ``lm_head``: ``Head = 2 * c * H * V``.

A forward is ``F = N * (Lin + Lora + Att) + Head``. The backward of a frozen 4-bit base needs
only input gradients, which cost one more matmul of the same size per base matmul; LoRA
needs input and weight gradients (two per matmul); attention's backward differentiates both
operands of each of its two products; the tied, frozen ``lm_head`` needs only the input
gradient: ``B = N * (Lin + 2 * Lora + 2 * Att) + Head``. Gradient checkpointing (decoder layers
and ``lm_head`` chunks) recomputes the forward once during the backward, so one sequence
with grad costs ``2F + B``.

* ``split``: a no-grad forward of the rejected side, then chosen and rejected with grad:
  ``F + 2 * (2F + B) = 5F + 2B``;
* ``joint``, ``sequential`` and TRL's path: both sides with grad once: ``4F + 2B``.

``roofline_seconds = step_flops / rate`` with ``rate`` the machine's measured matmul rate in
the step's compute dtype (:func:`qlora_orpo.models.dtype_probe.matmul_rate`): the time the step
would take if every FLOP ran at that rate and nothing else cost anything. ``time / roofline``
then says how far the step is from its matmul bound (the LoRA matmuls run in float32, often
slower than that rate, so the bound is optimistic for a bfloat16 step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..models.floor import ModelShape


@dataclass(frozen=True)
class StepFlops:
    """The parts of one sequence's forward (``F``) and backward (``B``), and the step's total."""

    linear: int
    lora: int
    attention: int
    lm_head: int
    layers: int
    method: str

    @property
    def forward(self) -> int:
        return self.layers * (self.linear + self.lora + self.attention) + self.lm_head

    @property
    def backward(self) -> int:
        return self.layers * (self.linear + 2 * self.lora + 2 * self.attention) + self.lm_head

    @property
    def total(self) -> int:
        """The step: ``5F + 2B`` for ``split`` (one extra no-grad forward), ``4F + 2B`` otherwise."""
        forwards = 5 if self.method == "split" else 4
        return forwards * self.forward + 2 * self.backward


def step_flops(
    shape: ModelShape,
    seq_len: int,
    lora_r: int = 16,
    lora_targets: Sequence[str] | str = "all-linear",
    method: str = "split",
    scored: int | None = None,
) -> StepFlops:
    """The FLOPs of one ORPO step on one pair whose sides are ``seq_len`` tokens each.

    ``scored``: positions per side that reach the ``lm_head`` (default ``seq_len - 1``: every
    next-token prediction, the NLL over prompt and response that the benchmark computes).
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    shapes = shape.linear_shapes()
    names = tuple(shapes) if lora_targets == "all-linear" else tuple(lora_targets)
    unknown = [n for n in names if n not in shapes]
    if unknown:
        raise ValueError(f"LoRA targets {unknown} are not linear layers of this model ({', '.join(shapes)})")
    s = seq_len
    c = s - 1 if scored is None else scored
    return StepFlops(
        linear=2 * s * sum(fan_in * fan_out for fan_in, fan_out in shapes.values()),
        lora=2 * s * lora_r * sum(sum(shapes[n]) for n in names),
        attention=2 * shape.heads * shape.head_dim * s * (s + 1),
        lm_head=2 * c * shape.hidden * shape.vocab,
        layers=shape.layers,
        method=method,
    )


def roofline_seconds(flops: int, rate: float) -> float:
    """Seconds for ``flops`` at ``rate`` FLOP/s."""
    if rate <= 0:
        raise ValueError(f"matmul rate must be positive, got {rate}")
    return flops / rate
