"""The analytic memory floor of one QLoRA + ORPO training step, from the model's config alone.

What must exist at the peak of an exact training step on one sequence of ``S`` tokens, for
a Llama-style decoder (``N`` layers, hidden ``H``, intermediate ``I``, vocabulary ``V``,
``h`` heads and ``g`` key/value heads of width ``d``, so ``K = g * d``), LoRA rank ``r`` on
every linear layer of the decoder, and ``a`` bytes per activation element:

Resident after loading (the benchmark's baseline already holds these):

* 4-bit weights: ``P_q / 2`` bytes, with ``P_q = N * (2*H*H + 2*H*K + 3*H*I)`` the decoder's
  linear weights (q, o: H x H; k, v: H x K; gate, up, down: H x I).
* quantisation statistics, per weight matrix of ``n`` elements: one absmax per 64 weights,
  ``B = ceil(n / 64)``. With double quantisation the absmax is itself 8-bit (``B`` bytes)
  plus one float32 per 256 of them (``4 * ceil(B / 256)``); without, ``4 * B``. Plus the
  code tables (16 float32 for NF4/FP4, 256 float32 for the 8-bit absmax code).
* full-precision parameters in float32: the embedding ``V * H``, the ``2N + 1`` RMSNorm
  weights, and ``lm_head`` when it is not tied. bitsandbytes leaves them unquantised and
  ``peft.prepare_model_for_kbit_training`` upcasts any 16-bit parameter to float32
  (``peft/utils/other.py``: "cast all non INT8 parameters to fp32"); ``loader.py`` loads
  them in float32 directly.
* LoRA weights, float32: ``P_lora = N * r * (2*(H+H) + 2*(H+K) + 3*(H+I))`` parameters
  (each adapted ``in x out`` linear adds ``r * (in + out)``), ``4 * P_lora`` bytes.

Added by the step (what the benchmark measures above its post-load baseline):

* LoRA gradients: ``4 * P_lora``; AdamW's two moments: ``8 * P_lora``.
* checkpointed boundary activations: ``(N + 2) * S * H * a`` -- the input of each layer
  (kept by gradient checkpointing), the last layer's output (the final norm's input) and
  the final hidden states (the ``lm_head``'s input).
* one layer's recomputed activations during its backward, with a memory-efficient
  attention kernel (SDPA/flash: no ``S x S`` score matrix):
  ``S * a * (8*H + 3*K + 4*I + 7*r) + S * a * (2*H + I)``. The first term is what the
  layer saves for backward: 8 hidden-sized tensors (normed input, q, rotated q, attention
  output, o_proj output, the residual sum, the second normed input, down_proj output),
  3 key/value-sized (k, v, rotated k), 4 intermediate-sized (gate, up, act(gate),
  act(gate) * up) and one ``S x r`` LoRA A output per linear. The second is the backward's
  working set: the gradients entering and leaving the layer and one intermediate-sized
  gradient.
* one chunk of logits: ``2 * c * V * 4`` bytes for ``c = min(chunk, S - 1)`` scored
  positions, float32 logits and their gradient (``step.chunked_token_logps``).

The parts of the second list do not all exist at once, so the floor is not their sum
(``inventory_bytes``); it follows their lifetimes in the one-sequence-at-a-time schedule
(``--step split``):

* the backward of a sequence starts with all its boundary activations alive and then runs
  either the ``lm_head`` chunks (first) or one layer's recomputation (later), never both;
  when the second side (rejected) is backpropagated, the first side's LoRA gradients are
  already held: ``backward = grads + boundary + max(layer, logits_chunk)``;
* AdamW allocates its states in ``optimizer.step()``, after the backward has freed the
  activations: ``optimizer = grads + states``.

``step_bytes = max(backward, optimizer)`` is the floor of a first step measured from the
post-load baseline, which is what ``scripts/bench_orpo.py`` measures (measured on
SmolLM2-135M at 256 tokens: +154 MiB during forward/backward, +83 MiB during the AdamW
step, the states allocated there). In a long run the states stay resident between steps:
``steady_step_bytes = states + backward`` above the loaded model, and ``total_bytes`` adds
the resident part. With ``sequences=2`` (a step that holds both sides at once: ``joint``,
``sequential``, TRL) no gradient exists yet when the backward starts, so
``backward = boundary + max(layer, logits_chunk)`` over both sequences.

The floor is a lower bound: it ignores allocator slack, the 4-bit weight dequantised
inside each matmul (one ``in x out`` compute-dtype copy at a time), AdamW's temporaries,
autograd bookkeeping, CPU kernel caches (oneDNN keeps compiled kernels per tensor shape),
library workspaces and the split step's no-grad rejected pass (freed before the chosen
pass starts). TRL's full ``(2, S, V)`` float32 logits are far above one chunk.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

MIB = 2**20
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Families whose attention input and MLP input projections are one fused linear layer each
# (qkv_proj, gate_up_proj): same weights, but LoRA on a fused layer has fewer parameters.
FUSED_PROJECTION_TYPES = ("phi3",)
BLOCKSIZE = 64  # bitsandbytes 4-bit block size: one absmax per 64 weights
NESTED_BLOCKSIZE = 256  # double quantisation: one float32 per 256 absmax values
CODE_BYTES_4BIT = 16 * 4  # the NF4/FP4 code table, float32
CODE_BYTES_NESTED = 256 * 4  # the 8-bit absmax code table, float32


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama-style decoder that memory depends on."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    fused_projections: bool = False

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """From a transformers config object or its ``config.json`` dict (Llama, Mistral, Qwen2, SmolLM...)."""
        get = config.get if isinstance(config, Mapping) else lambda key, default=None: getattr(config, key, default)
        hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
        return cls(
            hidden=hidden,
            layers=int(get("num_hidden_layers")),
            heads=heads,
            kv_heads=int(get("num_key_value_heads") or heads),
            head_dim=int(get("head_dim") or hidden // heads),
            intermediate=int(get("intermediate_size")),
            vocab=int(get("vocab_size")),
            tied_embeddings=bool(get("tie_word_embeddings", False)),
            fused_projections=get("model_type") in FUSED_PROJECTION_TYPES,
        )

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``name -> (in_features, out_features)`` of one layer's linear layers."""
        h, k, i, q = self.hidden, self.kv_width, self.intermediate, self.heads * self.head_dim
        if self.fused_projections:
            return {"qkv_proj": (h, q + 2 * k), "o_proj": (q, h), "gate_up_proj": (h, 2 * i), "down_proj": (i, h)}
        return {
            "q_proj": (h, q), "k_proj": (h, k), "v_proj": (h, k), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        }

    @property
    def quantised_params(self) -> int:
        """Weights of the decoder's linear layers (the ones bitsandbytes stores in 4 bits)."""
        return self.layers * sum(a * b for a, b in self.linear_shapes().values())

    @property
    def full_precision_params(self) -> int:
        """Embedding, RMSNorm weights (two per layer and the final one) and an untied lm_head."""
        lm_head = 0 if self.tied_embeddings else self.vocab * self.hidden
        return self.vocab * self.hidden + (2 * self.layers + 1) * self.hidden + lm_head

    @property
    def total_params(self) -> int:
        return self.quantised_params + self.full_precision_params

    def lora_params(self, r: int, targets: Sequence[str] | str = "all-linear") -> int:
        shapes = self.linear_shapes()
        names = tuple(shapes) if targets == "all-linear" else tuple(targets)
        unknown = [n for n in names if n not in shapes]
        if unknown:
            raise ValueError(f"LoRA targets {unknown} are not linear layers of this model ({', '.join(shapes)})")
        return self.layers * r * sum(sum(shapes[n]) for n in names)


@dataclass(frozen=True)
class MemoryFloor:
    """Bytes of each part (see the module docstring for each formula) and the floors built from them."""

    weights_4bit: int
    quant_stats: int
    full_precision: int
    lora_weights: int
    lora_grads: int
    optimizer_states: int
    boundary_activations: int
    layer_activations: int
    logits_chunk: int
    sequences: int = 1

    @property
    def resident_bytes(self) -> int:
        """Present after loading, before the step: already in the benchmark's baseline."""
        return self.weights_4bit + self.quant_stats + self.full_precision + self.lora_weights

    @property
    def backward_bytes(self) -> int:
        """At the start of the (last) backward: held gradients, boundaries, the larger of layer and chunk."""
        held = self.lora_grads if self.sequences == 1 else 0
        return held + self.boundary_activations + max(self.layer_activations, self.logits_chunk)

    @property
    def optimizer_bytes(self) -> int:
        """In the first ``optimizer.step()``: the gradients and the newly allocated AdamW states."""
        return self.lora_grads + self.optimizer_states

    @property
    def step_bytes(self) -> int:
        """Floor of a first step above the post-load baseline: compare with the benchmark's figure."""
        return max(self.backward_bytes, self.optimizer_bytes)

    @property
    def steady_step_bytes(self) -> int:
        """Floor of a later step above the loaded model: the AdamW states stay resident."""
        return self.optimizer_states + max(self.backward_bytes, self.lora_grads)

    @property
    def inventory_bytes(self) -> int:
        """Every step part summed, as if all were alive at once (an upper reference, not a floor)."""
        return (
            self.lora_grads + self.optimizer_states + self.boundary_activations
            + self.layer_activations + self.logits_chunk
        )

    @property
    def total_bytes(self) -> int:
        """Floor of a training run's memory: the loaded model plus a steady step."""
        return self.resident_bytes + self.steady_step_bytes

    def as_mib(self) -> dict[str, float]:
        parts = {k: v / MIB for k, v in asdict(self).items() if k != "sequences"}
        for name in ("resident", "backward", "optimizer", "step", "steady_step", "inventory", "total"):
            parts[name] = getattr(self, f"{name}_bytes") / MIB
        return parts

    def markdown(self) -> str:
        """A two-column markdown table of the parts and floors in MiB."""
        mib = self.as_mib()
        rows = ["| part | MiB |", "|---|---:|"]
        rows += [f"| {name.replace('_', ' ')} | {mib[name]:,.1f} |" for name in asdict(self) if name != "sequences"]
        rows += [f"| **{name.replace('_', ' ')}** | **{mib[name]:,.1f}** |"
                 for name in ("resident", "step", "steady_step", "total")]
        return "\n".join(rows)


def memory_floor(
    shape: ModelShape,
    seq_len: int,
    lora_r: int = 16,
    lora_targets: Sequence[str] | str = "all-linear",
    chunk_size: int = 128,
    activation_bytes: int = 4,
    double_quant: bool = True,
    sequences: int = 1,
    param_bytes: int = 4,
) -> MemoryFloor:
    """The floor of one training step on ``sequences`` sequences of ``seq_len`` tokens each.

    Args:
        shape: the model's sizes (:meth:`ModelShape.from_config`).
        seq_len: tokens per sequence (prompt + response).
        lora_r: LoRA rank; ``lora_targets`` the adapted linear layers.
        chunk_size: scored positions per ``lm_head`` call (``--logits-chunk-size``).
        activation_bytes: bytes per element of the residual stream: 4 in this project's QLoRA
            setup (the float32 embedding makes the stream float32; bitsandbytes casts each
            4-bit matmul's output back to its input's dtype), 2 for a 16-bit model.
        double_quant: whether the absmax statistics are themselves quantised.
        sequences: sequences whose activations are alive at once (1 for ``split``, 2 for
            ``joint``/``sequential`` with one pair).
        param_bytes: bytes per full-precision parameter (embedding, norms, untied lm_head):
            4 as ``loader.py`` loads them, 2 for a model kept in bfloat16 (``qlora-orpo plan``'s
            second variant).
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    p_q = shape.quantised_params
    stats = 0
    for fan_in, fan_out in shape.linear_shapes().values():  # bitsandbytes rounds blocks up per tensor
        blocks = -(-fan_in * fan_out // BLOCKSIZE)
        if double_quant:
            stats += blocks + 4 * -(-blocks // NESTED_BLOCKSIZE) + CODE_BYTES_4BIT + CODE_BYTES_NESTED
        else:
            stats += 4 * blocks + CODE_BYTES_4BIT
    stats *= shape.layers
    p_lora = shape.lora_params(lora_r, lora_targets)
    n_adapted = len(shape.linear_shapes()) if lora_targets == "all-linear" else len(tuple(lora_targets))
    h, k, i = shape.hidden, shape.kv_width, shape.intermediate
    tokens = sequences * seq_len
    saved = tokens * activation_bytes * (8 * h + 3 * k + 4 * i + n_adapted * lora_r)
    backward_working_set = tokens * activation_bytes * (2 * h + i)
    scored = min(chunk_size, sequences * (seq_len - 1))
    return MemoryFloor(
        weights_4bit=p_q // 2,
        quant_stats=stats,
        full_precision=param_bytes * shape.full_precision_params,
        lora_weights=4 * p_lora,
        lora_grads=4 * p_lora,
        optimizer_states=8 * p_lora,
        boundary_activations=(shape.layers + 2) * tokens * h * activation_bytes,
        layer_activations=saved + backward_working_set,
        logits_chunk=2 * scored * shape.vocab * 4,
        sequences=sequences,
    )
