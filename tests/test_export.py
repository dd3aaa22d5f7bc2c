"""Tests of qlora_orpo.export.merged: the merge invariant, idempotence, verification and its tolerance.

As in peft's ``_test_merge_layers``: the adapter is made non-identity first (random A and B),
then base + adapter logits must equal the merged model's after a safetensors round trip loaded
by plain transformers. For the export path that load happens in a separate ``python -I``
process that never imports qlora_orpo.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_llama, build_tokenizer
from safetensors import safe_open

from qlora_orpo.cli.export import main as export_main
from qlora_orpo.config import OrpoConfig
from qlora_orpo.export import adapters as A
from qlora_orpo.export import merged as E

IDS = [[5, 17, 42, 99, 7, 3, 250, 11, 64, 1], [2, 300, 8, 8, 120]]


# --------------------------------------------------------------------------------------------
# helpers and fixtures
# --------------------------------------------------------------------------------------------


def load_base(directory: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32), AutoTokenizer.from_pretrained(directory)


def non_identity_lora(model, seed: int = 1):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))


def logits(model, ids: list[list[int]]) -> list[torch.Tensor]:
    model.eval()
    with torch.no_grad():
        return [model(torch.tensor([seq])).logits[0].float() for seq in ids]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


PLAIN_LOAD = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
with torch.no_grad():
    out = [model(torch.tensor([ids])).logits[0].tolist() for ids in json.loads(sys.argv[2])]
assert "qlora_orpo" not in sys.modules
print(json.dumps(out))
"""


def plain_transformers_logits(directory: Path, ids: list[list[int]]) -> list[torch.Tensor]:
    """Logits of ``directory`` loaded by plain transformers in a process that never imports qlora_orpo."""
    proc = subprocess.run([sys.executable, "-I", "-c", PLAIN_LOAD, str(directory), json.dumps(ids)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [torch.tensor(x) for x in json.loads(proc.stdout.strip().splitlines()[-1])]


def stored_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(directory.glob("model*.safetensors")):
        with safe_open(str(shard), "pt") as handle:
            tensors.update({key: handle.get_tensor(key) for key in handle.keys()})  # noqa: SIM118
    return tensors


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A saved tiny base (tied embeddings, like SmolLM2), a non-identity adapter with a card, and its logits."""
    root = tmp_path_factory.mktemp("export")
    tokenizer = build_tokenizer()
    base_dir = root / "base"
    build_tiny_llama(tie=True).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    model, tokenizer = load_base(base_dir)
    base_logits = logits(model, IDS)
    peft_model = non_identity_lora(model)
    adapter_dir = A.save_adapter(peft_model, tokenizer, OrpoConfig(model=str(base_dir), eval_fraction=0.0),
                                 root / "adapter")
    return {"root": root, "base": base_dir, "adapter": adapter_dir, "base_logits": base_logits,
            "adapter_logits": logits(peft_model, IDS)}


@pytest.fixture(scope="module")
def exported(tiny):
    """The tiny adapter exported in float32 with small shards (so that there are several)."""
    result = E.export_merged(tiny["adapter"], tiny["root"] / "merged", max_shard_size="200KB")
    return result


# --------------------------------------------------------------------------------------------
# the merge invariant (in process, peft + plain transformers)
# --------------------------------------------------------------------------------------------


def test_adapter_is_not_identity(tiny):
    assert max_diff(tiny["adapter_logits"], tiny["base_logits"]) > 0.1


def test_merged_logits_equal_base_plus_adapter_after_a_safetensors_round_trip(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = load_base(tiny["base"])
    peft_model = A.load_adapter(model, load_base(tiny["base"])[1], tiny["adapter"])
    unmerged = logits(peft_model, IDS)
    merged = peft_model.merge_and_unload()
    torch.testing.assert_close(logits(merged, IDS), unmerged, rtol=0, atol=1e-5)
    merged.save_pretrained(tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    torch.testing.assert_close(logits(reloaded, IDS), unmerged, rtol=0, atol=1e-5)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()  # still tied


def test_merging_twice_changes_nothing(tiny):
    model, tokenizer = load_base(tiny["base"])
    peft_model = A.load_adapter(model, tokenizer, tiny["adapter"])
    peft_model.merge_adapter()
    once = {k: v.clone() for k, v in peft_model.get_base_model().state_dict().items() if "lora_" not in k}
    with pytest.warns(UserWarning, match="[Aa]lready merged"):
        peft_model.merge_adapter()
    twice = {k: v for k, v in peft_model.get_base_model().state_dict().items() if "lora_" not in k}
    assert once.keys() == twice.keys()
    assert all(torch.equal(once[k], twice[k]) for k in once)
    with pytest.warns(UserWarning, match="[Aa]lready merged"):
        final = peft_model.merge_and_unload().state_dict()  # unloading an already-merged model: same weights
    for key, value in once.items():
        assert torch.equal(final[key.replace(".base_layer", "")], value), key


# --------------------------------------------------------------------------------------------
# export_merged
# --------------------------------------------------------------------------------------------


def test_export_writes_a_plain_transformers_directory_that_reproduces_base_plus_adapter(tiny, exported):
    out = Path(exported.out_dir)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "model.safetensors.index.json", "README.md"} <= names
    assert exported.shards > 1 and len(list(out.glob("model-*.safetensors"))) == exported.shards
    assert not list(out.parent.glob(".merged.tmp-*"))
    # our own independent check, in a clean subprocess
    torch.testing.assert_close(plain_transformers_logits(out, IDS), tiny["adapter_logits"], rtol=0, atol=1e-5)
    assert max_diff(plain_transformers_logits(out, IDS), tiny["base_logits"]) > 0.1
    assert 0 <= exported.max_abs_diff <= exported.tolerance
    assert exported.adapter_effect > 0.1 and exported.tokens_compared > 0 and exported.seconds > 0


def test_export_keeps_the_tokenizer_and_chat_template(exported, tiny):
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(exported.out_dir)
    original = AutoTokenizer.from_pretrained(tiny["base"])
    assert saved.get_vocab() == original.get_vocab()
    messages = [{"role": "user", "content": "hello"}]
    assert saved.apply_chat_template(messages, tokenize=False) == original.apply_chat_template(messages, tokenize=False)


def test_export_card_records_the_verification(exported):
    meta = A.parse_card((Path(exported.out_dir) / "README.md").read_text(), "README.md")
    record = meta["qlora_orpo"]["export"]
    assert record["dtype"] == "float32" and record["max_abs_diff"] == exported.max_abs_diff
    assert meta["library_name"] == "transformers" and "merged" in meta["tags"]


def test_exporting_twice_gives_identical_tensors(tiny, exported):
    again = E.export_merged(tiny["adapter"], tiny["root"] / "merged-again", max_shard_size="200KB")
    first, second = stored_tensors(Path(exported.out_dir)), stored_tensors(Path(again.out_dir))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_export_into_an_earlier_export_replaces_it(tiny, tmp_path):
    out = tmp_path / "m"
    E.export_merged(tiny["adapter"], out)
    E.export_merged(tiny["adapter"], out, dtype="bfloat16")
    assert {str(t.dtype) for t in stored_tensors(out).values()} == {"torch.bfloat16"}


def test_export_refuses_a_directory_that_is_not_an_earlier_export(tiny, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "notes.txt").write_text("mine")
    with pytest.raises(E.ExportError, match="not an earlier export"):
        E.export_merged(tiny["adapter"], tmp_path / "m")
    assert (tmp_path / "m" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_export_is_stored_in_that_dtype_and_within_its_tolerance(tiny, tmp_path, dtype):
    result = E.export_merged(tiny["adapter"], tmp_path / dtype, dtype=dtype)
    assert {str(t.dtype) for t in stored_tensors(tmp_path / dtype).values()} == {f"torch.{dtype}"}
    config = json.loads((tmp_path / dtype / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == dtype
    assert 0 < result.max_abs_diff <= result.tolerance
    assert result.tolerance > E.tolerance("float32", result.logit_scale)


def test_export_that_lost_the_adapter_fails_verification_and_writes_nothing(tiny, tmp_path, monkeypatch):
    """A merge that silently drops the adapter (here: unload instead of merge) must not pass."""
    from peft.tuners.lora import LoraModel

    monkeypatch.setattr(LoraModel, "merge_and_unload", lambda self, **kwargs: self.unload())
    with pytest.raises(E.ExportVerificationError, match="differ from base \\+ adapter"):
        E.export_merged(tiny["adapter"], tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_export_onto_the_wrong_base_is_refused(tiny, tmp_path):
    other = tmp_path / "other"
    build_tiny_llama(tie=True, hidden=32).save_pretrained(other)
    build_tokenizer().save_pretrained(other)
    with pytest.raises(A.AdapterMismatchError, match="hidden_size"):
        E.export_merged(tiny["adapter"], tmp_path / "m", base=str(other))
    assert not (tmp_path / "m").exists()


def test_missing_adapter_file_is_named(tiny, tmp_path):
    import shutil

    broken = tmp_path / "adapter"
    shutil.copytree(tiny["adapter"], broken)
    (broken / "adapter_model.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(A.AdapterError, match=r"adapter_model\.safetensors: unreadable"):
        E.export_merged(broken, tmp_path / "m")


def test_export_script_prints_the_result_as_json(tiny, tmp_path, capsys):
    rc = export_main(["--adapter", str(tiny["adapter"]), "--out", str(tmp_path / "m"), "--dtype", "bfloat16",
                 "--max-shard-size", "100KB"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    result = json.loads(out.out)
    assert result["dtype"] == "bfloat16" and result["shards"] > 1 and result["max_abs_diff"] <= result["tolerance"]
    assert "verifying with plain transformers" in out.err


def test_export_script_reports_user_errors_on_one_line(tiny, tmp_path, capsys):
    rc = export_main(["--adapter", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("error: ") and err.endswith("nowhere: no such adapter directory")
    assert len(err.splitlines()) == 1


# --------------------------------------------------------------------------------------------
# the tolerance
# --------------------------------------------------------------------------------------------


def test_tolerance_is_relative_to_machine_epsilon_and_logit_scale():
    assert E.tolerance("float32", 39.0) == pytest.approx(64 * 2**-23 * 39.0)
    assert 1e-4 < E.tolerance("float32", 39.0) < 1e-3  # SmolLM2: measured 1e-4
    assert E.tolerance("float32", 0.01) == E.tolerance("float32", 1.0)  # never below eps-level of unit logits
    assert E.tolerance("float32", 20) < E.tolerance("float16", 20) < E.tolerance("bfloat16", 20)
    assert E.tolerance("bfloat16", 40) == pytest.approx(2 * E.tolerance("bfloat16", 20))
    with pytest.raises(E.ExportError):
        E.tolerance("int8", 1.0)


def test_verification_texts_fall_back_to_built_in_prompts_without_held_out_data(tiny):
    info = A.read_adapter(tiny["adapter"])
    tokenizer = load_base(tiny["base"])[1]
    texts, origin = E.verification_texts(info, tokenizer)
    assert origin == "built-in prompts" and len(texts) == E.VERIFY_PROMPTS
    assert all(text.startswith("<|im_start|>user") for text in texts)  # rendered with the chat template


def test_verification_texts_are_held_out_pairs_of_the_training_data(tiny, tmp_path):
    rows = [{"prompt": f"question {i}", "chosen": f"good answer {i}", "rejected": f"bad {i}"} for i in range(200)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    info = A.read_adapter(tiny["adapter"])
    info.card["qlora_orpo"]["training"].update({"data": str(data), "eval_fraction": 0.1})
    texts, origin = E.verification_texts(info, load_base(tiny["base"])[1], count=3)
    from qlora_orpo.data.preferences import load_preferences, split_holdout

    _, held = split_holdout(load_preferences(str(data)).pairs, 0.1)
    assert origin.startswith("3 held-out pairs") and len(texts) == 3
    assert all(p.chosen in t and p.prompt[0]["content"] in t for p, t in zip(held, texts, strict=False))
