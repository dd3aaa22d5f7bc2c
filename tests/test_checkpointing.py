"""gradient_checkpointing auto/on/off (models/checkpointing.py) and the loader's use of it."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_llama, build_tokenizer

from qlora_orpo.config import OrpoConfig
from qlora_orpo.models.checkpointing import HEADROOM, choose_checkpointing, kept_activation_bytes
from qlora_orpo.models.floor import ModelShape
from qlora_orpo.models.loader import load_model_for_training

SMOLLM2 = ModelShape(hidden=576, layers=30, heads=9, kv_heads=3, head_dim=64, intermediate=1536, vocab=49152,
                     tied_embeddings=True)
LLAMA3_8B = ModelShape(hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, intermediate=14336, vocab=128256,
                       tied_embeddings=False)
GIB = 2**30


def test_kept_activations_grow_with_tokens_layers_and_dropout():
    one = kept_activation_bytes(SMOLLM2, 1, 2, dropout=False)
    assert kept_activation_bytes(SMOLLM2, 1000, 2, dropout=False) == 1000 * one
    assert kept_activation_bytes(SMOLLM2, 1, 4, dropout=False) == 2 * one
    assert kept_activation_bytes(SMOLLM2, 1, 2, dropout=True) > one


def test_auto_keeps_activations_where_they_fit_and_recomputes_where_not():
    # SmolLM2-135M, one pair of 512-token sides, bf16: about 1 GiB kept; a 24 GiB machine keeps them.
    small = choose_checkpointing("auto", SMOLLM2, 512, 1, 2, True, 20 * GIB)
    assert not small.enabled and 0.5 * GIB < small.kept_bytes < 2 * GIB
    assert "gradient checkpointing off (auto:" in small.describe()
    # Llama-3-8B, 2048-token sides, on a 24 GB card with the 4-bit model loaded: tens of GiB, recompute.
    big = choose_checkpointing("auto", LLAMA3_8B, 2048, 1, 2, True, 18 * GIB)
    assert big.enabled and big.kept_bytes > 20 * GIB
    # The boundary is HEADROOM of the free memory.
    kept = small.kept_bytes
    assert not choose_checkpointing("auto", SMOLLM2, 512, 1, 2, True, int(kept / HEADROOM) + 1).enabled
    assert choose_checkpointing("auto", SMOLLM2, 512, 1, 2, True, int(kept / HEADROOM) - 1).enabled
    assert choose_checkpointing("on", SMOLLM2, 512, 1, 2, True, 0).describe() == "gradient checkpointing on"
    assert not choose_checkpointing("off", LLAMA3_8B, 2048, 8, 2, True, 0).enabled
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        choose_checkpointing("maybe", SMOLLM2, 512, 1, 2, True, 0)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt") / "tiny"
    tokenizer = build_tokenizer()
    build_tiny_llama(vocab_size=len(tokenizer), layers=3).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_the_estimate_bounds_what_autograd_keeps_without_checkpointing(tiny_dir):
    """Every tensor autograd saves in a forward of the 4-bit LoRA model without checkpointing, parameters
    and the layers' inputs aside, counted once: at most the estimate, and not far below it."""
    cfg = OrpoConfig(model=str(tiny_dir), quant="nf4", compute_dtype="float32", gradient_checkpointing="off",
                     lora_dropout=0.1, max_length=64)
    model, _, info = load_model_for_training(cfg)
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params and (tensor.dtype.is_floating_point or tensor.dtype == torch.bool):
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    tokens = 40
    ids = torch.randint(3, 60, (1, tokens))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids).logits.sum().backward()
    shape = ModelShape.from_config(model.config)
    estimate = kept_activation_bytes(shape, tokens, 4, dropout=True)
    logits = tokens * shape.vocab * 4 * 3  # the head's logits and softmax, outside the decoder's layers
    counted = sum(seen.values()) - logits
    print(f"autograd kept {counted:,} bytes; estimate {estimate:,}")
    assert 0.5 * estimate <= counted <= estimate, (counted, estimate)
    assert info.checkpointing is not None and not info.checkpointing.enabled


@pytest.mark.parametrize(("setting", "budget_mib", "enabled"), [("auto", 1, True), ("auto", 50_000, False),
                                                                  ("on", 50_000, True), ("off", 1, False)])
def test_the_loader_follows_the_choice(tiny_dir, setting, budget_mib, enabled):
    cfg = OrpoConfig(model=str(tiny_dir), quant="nf4", compute_dtype="float32", gradient_checkpointing=setting,
                     memory_budget_mib=budget_mib)
    model, _, info = load_model_for_training(cfg)
    assert model.base_model.model.is_gradient_checkpointing is enabled
    assert info.checkpointing.enabled is enabled and ("checkpointing " + ("on" if enabled else "off")) in info.describe()


def test_a_run_records_what_auto_resolved_to(tiny_dir, tmp_path):
    from qlora_orpo.recipes.finetune import run
    from qlora_orpo.training.metrics import read_metrics

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(f'{{"prompt": "hello {i}", "chosen": "yes {i}", "rejected": "no {i}"}}\n' for i in range(8)))
    for budget, want in ((1, True), (50_000, False)):
        cfg = OrpoConfig(model=str(tiny_dir), data=str(data), quant="nf4", compute_dtype="float32", max_steps=1,
                         eval_fraction=0.0, health_prompts=0, eval_every=0, save_every=0, export="none",
                         memory_budget_mib=budget, output_dir=str(tmp_path / "runs"), run_name=f"b{budget}")
        summary = run(cfg)
        assert summary["gradient_checkpointing"] is want
        records = read_metrics(tmp_path / "runs" / f"b{budget}" / "metrics.jsonl")
        assert [r["gradient_checkpointing"] for r in records if r["split"] == "summary"] == [want]
