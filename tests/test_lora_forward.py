"""The lean LoRA forward on 4-bit layers (models/lora_forward.py) against peft's own.

A tiny Llama is quantised to NF4 on the CPU and given LoRA with random A and B (so the
adapter changes the output); each case runs the same input through peft's forward and the
lean one from the same weights and the same RNG state.
"""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_llama

from qlora_orpo.models.loader import load_base
from qlora_orpo.models.lora_forward import use_lean_lora_forward


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("lean") / "tiny"
    build_tiny_llama(vocab_size=64).save_pretrained(directory)
    return directory


def lora_model(directory, compute_dtype: torch.dtype, dropout: float = 0.0, use_dora: bool = False):
    from peft import LoraConfig, get_peft_model

    base = load_base(str(directory), "nf4", "cpu", compute_dtype)
    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear",
                        init_lora_weights=False, use_dora=use_dora)
    return get_peft_model(base, config, autocast_adapter_dtype=True)


def run(model, ids: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits of ``ids`` and the LoRA weights' gradients of their sum of squares."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    logits = model(input_ids=ids).logits.float()
    if logits.requires_grad:  # a disabled adapter leaves nothing to differentiate
        logits.pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


@pytest.mark.parametrize("train", [True, False])
def test_in_float32_the_lean_forward_is_peft_s_to_the_bit(tiny_dir, train):
    """The same arithmetic without the clone and casts: equal logits and LoRA gradients (no dropout
    drawn; in eval mode a dropout module is the identity either way)."""
    model = lora_model(tiny_dir, torch.float32, 0.0 if train else 0.3)
    model.train(train)
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(0))
    want_logits, want_grads = run(model, ids)
    changed = use_lean_lora_forward(model)
    assert changed == 2 * 7  # two layers of q, k, v, o, gate, up, down
    got_logits, got_grads = run(model, ids)
    assert torch.equal(got_logits, want_logits)
    assert want_grads.keys() == got_grads.keys() and len(want_grads) == 2 * changed  # A and B of each
    for name, grad in want_grads.items():
        assert torch.equal(got_grads[name], grad), name
        assert got_grads[name].dtype == torch.float32  # the LoRA weights' own dtype


def test_in_bfloat16_the_lean_forward_rounds_only_the_lora_matmuls(tiny_dir):
    """bf16 compute: the LoRA matmuls run in bfloat16 (as under autocast); the result stays within
    bfloat16 rounding of peft's float32 LoRA path, and the gradients point the same way."""
    model = lora_model(tiny_dir, torch.bfloat16)
    model.train()
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(1))
    want_logits, want_grads = run(model, ids)
    use_lean_lora_forward(model)
    got_logits, got_grads = run(model, ids)
    scale = want_logits.abs().max()
    assert (got_logits - want_logits).abs().max() <= 0.02 * scale
    assert not torch.equal(got_logits, want_logits)  # it did take the bfloat16 path
    for name, grad in want_grads.items():
        cosine = torch.nn.functional.cosine_similarity(got_grads[name].flatten(), grad.flatten(), dim=0)
        assert cosine > 0.99, (name, float(cosine))


def test_other_paths_keep_peft_s_forward(tiny_dir):
    """DoRA, a disabled adapter and a merged one run peft's own forward, unchanged."""
    dora = lora_model(tiny_dir, torch.float32, use_dora=True)
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(2))
    want, _ = run(dora, ids)
    use_lean_lora_forward(dora)
    got, _ = run(dora, ids)
    assert torch.equal(got, want)

    model = lora_model(tiny_dir, torch.float32)
    model.eval()
    with model.disable_adapter():
        base, _ = run(model, ids)
    use_lean_lora_forward(model)
    with model.disable_adapter():
        lean_base, _ = run(model, ids)
    assert torch.equal(lean_base, base)
    adapted, _ = run(model, ids)
    assert not torch.allclose(adapted, base)  # the adapter is on again and changes the output


def test_the_training_loader_uses_it_and_the_adapter_saves_in_peft_s_format(tiny_dir, tmp_path):
    from qlora_orpo.config import OrpoConfig
    from qlora_orpo.models.loader import load_model_for_training
    from qlora_orpo.models.lora_forward import _lean_forward

    tokenizer_dir = tiny_dir  # load_model_for_training loads a tokenizer: give it one
    from conftest import build_tokenizer

    build_tokenizer().save_pretrained(tokenizer_dir)
    model, _, _ = load_model_for_training(OrpoConfig(model=str(tiny_dir), quant="nf4", compute_dtype="float32"))
    layers = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    assert layers and all(type(m).forward is _lean_forward for m in layers)
    model.save_pretrained(tmp_path / "adapter")
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")).keys()
    assert len(keys) == 2 * len(layers) and all(".lora_A.weight" in k or ".lora_B.weight" in k for k in keys)


def test_cpu_dropout_keeps_one_minus_p_scales_by_its_inverse_and_reproduces_from_the_seed():
    from qlora_orpo.models.lora_forward import cpu_dropout

    x = torch.ones(1000, 1001, dtype=torch.bfloat16, requires_grad=True)
    torch.manual_seed(5)
    y = cpu_dropout(x, 0.05)
    kept = y != 0
    assert set(y.unique().float().tolist()) == {0.0, float(torch.tensor(1 / 0.95, dtype=torch.bfloat16))}
    sigma = (0.05 * 0.95 / x.numel()) ** 0.5
    assert abs(float(kept.float().mean()) - 0.95) < 5 * sigma  # ~1e-3 for 1e6 draws
    y.float().sum().backward()
    assert torch.equal(x.grad != 0, kept)  # the gradient flows through the kept elements only
    torch.manual_seed(5)
    assert torch.equal(cpu_dropout(x, 0.05), y)  # the default generator: seeds and resumes reproduce it
    rows = kept.float().mean(dim=1)
    assert float(rows.min()) > 0.9 and float(rows.max()) < 0.99  # no stretch of the mask left unrandomised


def test_with_dropout_a_lean_layer_is_peft_s_in_expectation(tiny_dir):
    """Dropout on: the same distribution as peft's, other draws. A layer is linear in its dropout
    mask, so the mean of many dropout forwards converges on the dropout-free output."""
    model = lora_model(tiny_dir, torch.float32, 0.5)
    use_lean_lora_forward(model)
    layer = next(m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer"))
    x = torch.randn(4, layer.in_features, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        layer.eval()
        clean = layer(x)
        layer.train()
        torch.manual_seed(0)
        draws = torch.stack([layer(x) for _ in range(400)])
    assert not torch.equal(draws[0], draws[1])
    spread = (draws - clean).abs().mean()
    assert spread > 0  # the dropout does move the adapter's output
    assert (draws.mean(0) - clean).abs().mean() < 0.15 * spread  # 400 draws: the noise shrinks ~20x
