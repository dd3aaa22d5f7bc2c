"""``--use-rslora`` and ``--use-dora``: they reach peft, train, save, reload in plain peft, and merge and verify."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_export import IDS, load_base, logits, max_diff, plain_transformers_logits
from userfeatures import pair_rows, save_tiny_model, train_flags, write_jsonl

from qlora_orpo.cli import main
from qlora_orpo.config import OrpoConfig
from qlora_orpo.export import adapters as A
from qlora_orpo.export import merged as E


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    return {"root": root, "model": save_tiny_model(root / "model"),
            "data": write_jsonl(root / "pairs.jsonl", pair_rows(24))}


def lora_modules(model):
    return [m for m in model.modules() if hasattr(m, "lora_A") and "default" in getattr(m, "scaling", {})]


@pytest.mark.parametrize("flag, method, quant", [("--use-dora", "dora", "none"), ("--use-dora", "dora", "nf4"),
                                                 ("--use-rslora", "rslora", "none")])
def test_variant_trains_a_step_and_saves_an_adapter_that_plain_peft_loads(tiny, flag, method, quant):
    """DoRA on 4-bit layers too (peft dequantises the weight to take its norm)."""
    from peft import PeftModel

    out = tiny["root"] / "runs"
    assert main(["train", *train_flags(tiny["model"], tiny["data"], out, method + quant), flag, "--max-steps", "2",
                 "--eval-fraction", "0", "--save-every", "0", "--quant", quant]) == 0
    adapter = out / (method + quant) / "adapter"
    peft_config = json.loads((adapter / "adapter_config.json").read_text())
    assert peft_config["use_dora"] is (method == "dora") and peft_config["use_rslora"] is (method == "rslora")
    tensors = load_file(adapter / "adapter_model.safetensors")
    magnitudes = [k for k in tensors if "lora_magnitude_vector" in k]
    assert bool(magnitudes) is (method == "dora")  # DoRA's trained column norms are saved with A and B
    assert max(float(t.abs().max()) for k, t in tensors.items() if "lora_B" in k) > 0  # a step changed B
    card = A.read_adapter(adapter).card
    assert card["qlora_orpo"]["adapter"]["method"] == method
    assert card["qlora_orpo"]["training"]["use_" + method] is True

    model, _ = load_base(tiny["model"])
    reloaded = PeftModel.from_pretrained(model, adapter)  # plain peft, no qlora_orpo code
    scaling = {m.scaling["default"] for m in lora_modules(reloaded)}
    assert scaling == {8 / 4 ** 0.5 if method == "rslora" else 8 / 4}  # rsLoRA: alpha / sqrt(r)
    assert card["qlora_orpo"]["adapter"]["scaling"] == pytest.approx(scaling.pop())


@pytest.mark.parametrize("variant", [{"use_dora": True}, {"use_rslora": True}])
def test_variant_adapter_merges_and_verifies_like_any_other(tiny, variant):
    """As tests/test_export.py: a non-identity adapter, merged in float32, verified by plain transformers."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer = load_base(tiny["model"])
    torch.manual_seed(1)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                  init_lora_weights=False, **variant))
    if "use_dora" in variant:  # a magnitude other than the weight's own norm, so the DoRA part matters
        for module in lora_modules(peft_model):
            module.lora_magnitude_vector["default"].weight.data.mul_(1.5)
    expected = logits(peft_model, IDS)
    name = next(iter(variant))
    adapter = A.save_adapter(peft_model, tokenizer, OrpoConfig(model=str(tiny["model"]), eval_fraction=0.0, **variant),
                             tiny["root"] / f"adapter-{name}")
    result = E.export_merged(adapter, tiny["root"] / f"merged-{name}")
    assert result.max_abs_diff <= result.tolerance and result.adapter_effect > 100 * result.tolerance
    merged = plain_transformers_logits(tiny["root"] / f"merged-{name}", IDS)
    assert max_diff(merged, expected) <= 1e-4
    assert max_diff(merged, logits(load_base(tiny["model"])[0], IDS)) > 0.1  # the adapter is in the merged weights
    card = (tiny["root"] / f"merged-{name}" / "README.md").read_text()
    assert f"ORPO {'DoRA' if name == 'use_dora' else 'rsLoRA'} adapter, merged" in card


def test_the_flags_default_off_and_a_resume_may_not_change_them(tmp_path):
    from qlora_orpo.core.errors import ConfigError
    from qlora_orpo.training.resume import resume_config

    cfg = OrpoConfig()
    assert cfg.use_dora is False and cfg.use_rslora is False
    assert OrpoConfig.from_dict({"use_dora": "true"}).use_dora is True
    cfg.to_file(tmp_path / "config.yaml")  # a run trained as plain LoRA
    with pytest.raises(ConfigError, match=r"use_dora \(False in the run, True given\)"):
        resume_config(tmp_path, {"use_dora": True})
