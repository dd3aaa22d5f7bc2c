"""Defects found by a code read (issue 20), each pinned by a test that failed before its fix.

Pure functions and small files here; the faults injected into whole runs (kill -9, a full
disk, a damaged checkpoint) are in ``test_faults.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

from qlora_orpo.config import OrpoConfig
from qlora_orpo.training.loss import inverse_one_minus_p, log1mexp, orpo_logp_grads, orpo_loss
from qlora_orpo.training.optim import total_optimizer_steps

# -- numerics: a mean log-prob of exactly 0.0 -------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_mean_logprob_of_zero_gives_a_finite_loss_and_finite_gradients(dtype):
    # A short memorised reply in float32: every token's log-prob rounds to 0, so the mean is 0.0.
    chosen = torch.tensor([0.0, -0.5], dtype=dtype, requires_grad=True)
    rejected = torch.tensor([-1.5, 0.0], dtype=dtype, requires_grad=True)
    nll = -chosen
    loss, metrics = orpo_loss(chosen, rejected, nll, beta=0.1)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(v) for v in metrics.values())
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
    d_chosen, d_rejected = orpo_logp_grads(chosen, rejected, beta=0.1)
    assert torch.isfinite(d_chosen).all() and torch.isfinite(d_rejected).all()
    assert torch.isfinite(inverse_one_minus_p(torch.zeros(1, dtype=dtype))).all()
    # Both sides at 0.0: no inf - inf.
    both = torch.zeros(1, dtype=dtype, requires_grad=True)
    loss, _ = orpo_loss(both, both.clone(), -both, beta=0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(both.grad).all()


def test_the_clamp_leaves_resolvable_values_exact():
    x = torch.tensor([-1e-12, -1e-7, -0.5, -3.0], dtype=torch.float64)
    expected = [math.log(-math.expm1(v)) for v in x.tolist()]
    torch.testing.assert_close(log1mexp(x), torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    # The square of the largest coefficient stays finite in float32 (a gradient norm squares it).
    assert torch.isfinite(inverse_one_minus_p(torch.zeros(1)) ** 2).all()


# -- epochs mode under several ranks ---------------------------------------------------------


def test_epochs_mode_total_steps_account_for_the_world_size():
    cfg = OrpoConfig(max_steps=0, epochs=2, batch_size=2, grad_accum=4)
    # 100 pairs, 8 per optimizer step per rank: one rank needs 25 steps for 2 epochs, 4 ranks 7.
    assert total_optimizer_steps(cfg, 100) == 25
    assert total_optimizer_steps(cfg, 100, world_size=1) == 25
    assert total_optimizer_steps(cfg, 100, world_size=4) == math.ceil(2 * 100 / (2 * 4 * 4))
    assert total_optimizer_steps(OrpoConfig(max_steps=7), 100, world_size=4) == 7  # max_steps is steps


# -- the adapter card -------------------------------------------------------------------------


def _tiny_base(directory):
    from conftest import build_tiny_llama, build_tokenizer

    tokenizer = build_tokenizer()
    build_tiny_llama().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _load(directory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32), AutoTokenizer.from_pretrained(directory)


def _lora(model, seed: int = 1):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))


def test_a_card_whose_front_matter_holds_a_markdown_rule_still_parses(tmp_path):
    import yaml

    from qlora_orpo.export.card import parse_card, render_card

    system = "You are terse.\n---\nNever use markdown rules like the one above.\n---\n"
    meta = {"qlora_orpo": {"base": {"name": "b", "fingerprint": {"architecture": "X"}},
                           "training": {"system_prompt": system}}}
    text = render_card(meta)
    front = text.split("\n")
    assert any(line.strip() == "---" for line in front[1:front.index("---", 1)]), "the value really holds a '---' line"
    parsed = parse_card(text, tmp_path / "README.md")
    assert parsed["qlora_orpo"]["training"]["system_prompt"] == system
    # A block scalar (another YAML writer) with an indented rule: the same.
    block = "---\n" + yaml.safe_dump({"qlora_orpo": meta["qlora_orpo"]}, default_style="|") + "---\n# card\n"
    assert parse_card(block, "README.md")["qlora_orpo"]["training"]["system_prompt"] == system


def test_an_adapter_records_no_local_path_but_still_finds_its_base(tmp_path):
    import hashlib
    import json

    from qlora_orpo.data.preferences import load_preferences
    from qlora_orpo.export import adapters as A

    base_dir = _tiny_base(tmp_path / "home" / "someone" / "models" / "tiny-base")
    data_file = tmp_path / "home" / "someone" / "data" / "pairs.jsonl"
    data_file.parent.mkdir(parents=True)
    data_file.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "yes", "rejected": "no"}) + "\n"
                                 for i in range(6)))
    model, tokenizer = _load(base_dir)
    cfg = OrpoConfig(model=str(base_dir), data=str(data_file), output_dir=str(tmp_path / "home" / "runs"))
    out = A.save_adapter(_lora(model), tokenizer, cfg, tmp_path / "run" / "adapter", data=load_preferences(str(data_file)))
    for file in out.iterdir():  # nothing shared names this machine's directories
        text = file.read_text(encoding="utf-8", errors="replace") if file.suffix != ".safetensors" else ""
        assert str(tmp_path) not in text, f"{file.name} leaks a local path"
    meta = A.read_adapter(out).card["qlora_orpo"]
    assert meta["base"]["name"] == "tiny-base" and meta["training"]["model"] == "tiny-base"
    assert meta["data"]["name"] == "pairs.jsonl"
    assert meta["data"]["sha256"] == hashlib.sha256(data_file.read_bytes()).hexdigest()
    assert meta["training"]["output_dir"] == "runs"
    # The local paths stay beside the adapter (in a run: inside the run directory), and are used.
    assert A.local_record_path(out) == tmp_path / "run" / "adapter.local.json"
    assert A.resolve_base(A.read_adapter(out)) == str(base_dir)


# -- a template that refuses the system role, wherever a template is rendered -----------------


def test_export_verification_folds_a_system_turn_for_a_template_that_refuses_it(tmp_path):
    import json

    from families import FAMILIES

    from qlora_orpo.export.adapters import AdapterInfo
    from qlora_orpo.export.verify import verification_texts

    tokenizer = FAMILIES["gemma2"].build_tokenizer()
    data_file = tmp_path / "pairs.jsonl"
    rows = [{"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"hello {i}"}],
             "chosen": "the quick fox", "rejected": "the lazy dog"} for i in range(12)]
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    card = {"qlora_orpo": {"base": {}, "training": {"data": str(data_file), "eval_fraction": 0.5}}}
    texts, origin = verification_texts(AdapterInfo(tmp_path / "adapter", {}, card), tokenizer)
    assert "held-out pairs" in origin and texts
    for text in texts:
        assert "<start_of_turn>user\nbe brief\n\nhello" in text and "<start_of_turn>model\nthe quick fox" in text


def test_the_committed_adapter_names_no_local_path():
    import re
    from pathlib import Path

    local = re.compile(r"(^|[\s'\"(:])/(root|home|work|Users|tmp|mnt|data)/")
    adapters = Path(__file__).resolve().parents[1] / "adapters"
    files = [f for f in adapters.rglob("*") if f.is_file() and f.suffix != ".safetensors"]
    assert files
    for file in files:
        for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
            assert not local.search(line), f"{file}:{number}: {line.strip()}"


# -- the fingerprint notices a merged derivative ----------------------------------------------


def test_a_model_with_the_adapter_already_merged_is_refused_as_its_base(tmp_path):
    from qlora_orpo.core.errors import AdapterMismatchError
    from qlora_orpo.export import adapters as A

    base_dir = _tiny_base(tmp_path / "base")
    model, tokenizer = _load(base_dir)
    out = A.save_adapter(_lora(model), tokenizer, OrpoConfig(model=str(base_dir)), tmp_path / "adapter")
    merged = A.load_adapter(_load(base_dir)[0], tokenizer, out).merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")  # what an export leaves, and what a user may take for the base
    tokenizer.save_pretrained(tmp_path / "merged")
    for derivative in (merged, _load(tmp_path / "merged")[0]):
        with pytest.raises(AdapterMismatchError, match="layers_sha256") as caught:
            A.load_adapter(derivative, tokenizer, out)
        assert caught.value.fields == ["layers_sha256"]  # the embeddings alone cannot tell
    A.load_adapter(_load(base_dir)[0], tokenizer, out)  # the base itself still passes


def test_the_layer_hash_is_the_same_for_a_bfloat16_load_and_old_cards_are_not_checked_on_it(tmp_path):
    from transformers import AutoModelForCausalLM

    from qlora_orpo.models.fingerprint import fingerprint, fingerprint_differences

    base_dir = _tiny_base(tmp_path / "base")
    model, tokenizer = _load(base_dir)
    full = fingerprint(model, tokenizer)
    half = fingerprint(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16), tokenizer)
    assert full["layers_sha256"] and half == full  # read from the checkpoint, not the rounded copy
    older_card = {k: v for k, v in full.items() if k != "layers_sha256"}
    assert fingerprint_differences(older_card, full) == []


# -- multi-process: the wait of the ranks that do not evaluate or export ----------------------


def test_collectives_wait_an_explicit_long_time_set_by_the_environment(monkeypatch):
    from datetime import timedelta

    from qlora_orpo.core.errors import UserError
    from qlora_orpo.training import distributed

    monkeypatch.delenv("QLORA_ORPO_COLLECTIVE_TIMEOUT_S", raising=False)
    assert distributed.collective_timeout() == timedelta(hours=4)  # > NCCL's 10-minute default
    monkeypatch.setenv("QLORA_ORPO_COLLECTIVE_TIMEOUT_S", "90")
    assert distributed.collective_timeout() == timedelta(seconds=90)
    for bad in ("soon", "0"):
        monkeypatch.setenv("QLORA_ORPO_COLLECTIVE_TIMEOUT_S", bad)
        with pytest.raises(UserError, match="QLORA_ORPO_COLLECTIVE_TIMEOUT_S"):
            distributed.collective_timeout()
