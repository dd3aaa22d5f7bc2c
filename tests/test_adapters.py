"""Tests of qlora_orpo.export.adapters (self-describing adapter folders) and qlora_orpo.recipes.chat.

Tiny 2-layer Llamas saved into temporary directories stand in for the base; one
integration test loads the committed adapter onto the embedded SmolLM2 with plain peft.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_llama, build_tokenizer

from qlora_orpo.config import OrpoConfig
from qlora_orpo.core.errors import UserError
from qlora_orpo.data.preferences import PreferenceData, PreferencePair
from qlora_orpo.export import adapters as A
from qlora_orpo.export import card as adapter_card

REPO = Path(__file__).resolve().parents[1]
COMMITTED_ADAPTER = REPO / "adapters" / "smollm2-135m-hh-harmless-orpo"


# --------------------------------------------------------------------------------------------
# helpers and fixtures
# --------------------------------------------------------------------------------------------


def save_base(directory: Path, tokenizer=None, **llama) -> Path:
    """A tiny Llama and its tokenizer saved as a plain transformers directory."""
    tokenizer = tokenizer or build_tokenizer()
    build_tiny_llama(**llama).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def load_base(directory: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32), AutoTokenizer.from_pretrained(directory)


def non_identity_lora(model, seed: int = 1, r: int = 4):
    """LoRA on every linear layer with random A *and* B, so that it changes the logits."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))


def fake_data(rows: int = 3) -> PreferenceData:
    pairs = [PreferencePair(({"role": "user", "content": f"q{i}"},), "yes", "no", i + 1, "mem.jsonl") for i in range(rows)]
    return PreferenceData(pairs, [], "prompt/chosen/rejected", "mem.jsonl", rows + 1)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(ids).logits


IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return save_base(tmp_path_factory.mktemp("base") / "tiny")


@pytest.fixture(scope="module")
def adapter(base_dir, tmp_path_factory):
    """(adapter dir, logits of base + adapter on IDS) for a non-identity adapter saved with a card."""
    model, tokenizer = load_base(base_dir)
    peft_model = non_identity_lora(model)
    out = tmp_path_factory.mktemp("adapter") / "a"
    cfg = OrpoConfig(model=str(base_dir), data="mem.jsonl", lora_r=4)
    A.save_adapter(peft_model, tokenizer, cfg, out, data=fake_data(), metrics={"reward_accuracy": 0.75, "nll": 1.5})
    return out, logits(peft_model, IDS)


def copy_adapter(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------------------------
# saving: peft's files + card
# --------------------------------------------------------------------------------------------


def test_save_writes_peft_files_and_a_card_with_fingerprint_data_config_metrics(adapter, base_dir):
    path, _ = adapter
    assert sorted(p.name for p in path.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert not list(path.parent.glob(".*tmp*")), "no temporary directory left behind"
    meta = A.parse_card((path / "README.md").read_text(), path / "README.md")
    ours = meta["qlora_orpo"]
    model, tokenizer = load_base(base_dir)
    assert ours["base"]["fingerprint"] == A.fingerprint(model, tokenizer)
    assert ours["base"]["fingerprint"]["vocab_size"] == 400 and ours["base"]["fingerprint"]["num_layers"] == 2
    assert "path" not in ours["base"] and ours["base"]["model"] == base_dir.name  # no local path in a shared card
    assert A.local_record(path)["base"] == {"path": str(base_dir), "model": str(base_dir)}  # kept beside it
    assert ours["data"] == {"name": "mem.jsonl", "source": "mem.jsonl", "shape": "prompt/chosen/rejected",
                            "rows": 4, "pairs": 3}
    assert ours["training"]["lora_r"] == 4 and OrpoConfig(**ours["training"]).lora_r == 4
    assert ours["metrics"] == {"reward_accuracy": 0.75, "nll": 1.5}
    assert meta["library_name"] == "peft"
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == base_dir.name  # no hub id known: the directory's name


def test_embedded_base_is_named_by_its_hub_id_in_adapter_config(tmp_path, base_dir):
    model, tokenizer = load_base(base_dir)
    out = A.save_adapter(non_identity_lora(model), tokenizer, OrpoConfig(model="embedded"), tmp_path / "a")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    meta = A.read_adapter(out).card
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["qlora_orpo"]["base"]["model"] == "embedded"
    assert A.local_record(out)["base"]["path"] == str(base_dir)  # the local path trained from, beside the adapter


@pytest.mark.parametrize(
    ("spec", "path", "expected"),
    [
        ("embedded", "/cache/SmolLM2", "HuggingFaceTB/SmolLM2-135M-Instruct"),
        ("Qwen/Qwen2.5-0.5B", "/hf/models--Qwen--Qwen2.5-0.5B/snapshots/abc", "Qwen/Qwen2.5-0.5B"),
        ("/hf/models--Qwen--Qwen2.5-0.5B/snapshots/abc", None, "Qwen/Qwen2.5-0.5B"),
        ("/home/me/my-model", "/home/me/my-model", None),
    ],
)
def test_base_hub_id(spec, path, expected):
    assert adapter_card.base_hub_id(spec, path) == expected


def test_saving_again_replaces_the_adapter_and_a_failed_save_keeps_the_old_one(tmp_path, base_dir, monkeypatch):
    model, tokenizer = load_base(base_dir)
    peft_model = non_identity_lora(model)
    out = A.save_adapter(peft_model, tokenizer, None, tmp_path / "a", metrics={"nll": 1.0})
    A.save_adapter(peft_model, tokenizer, None, out, metrics={"nll": 2.0})
    assert A.read_adapter(out).card["qlora_orpo"]["metrics"] == {"nll": 2.0}

    def broken(meta):
        raise OSError("disk full")

    monkeypatch.setattr(A, "render_card", broken)
    with pytest.raises(A.AdapterError, match="could not write .*disk full.*the previous adapter there is kept"):
        A.save_adapter(peft_model, tokenizer, None, out, metrics={"nll": 3.0})
    assert A.read_adapter(out).card["qlora_orpo"]["metrics"] == {"nll": 2.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "a.local.json"]


def test_train_save_final_adapter_uses_the_card(tmp_path, base_dir):
    from qlora_orpo.recipes.finetune import save_final_adapter

    model, tokenizer = load_base(base_dir)
    out = save_final_adapter(non_identity_lora(model), tokenizer, OrpoConfig(model=str(base_dir)), tmp_path,
                             fake_data(), {"nll": 1.0})
    assert out == tmp_path / "adapter"
    assert A.read_adapter(out).card["qlora_orpo"]["data"]["pairs"] == 3


# --------------------------------------------------------------------------------------------
# loading: the fingerprint check
# --------------------------------------------------------------------------------------------


def test_load_adapter_onto_the_right_base_reproduces_the_logits(adapter, base_dir):
    path, expected = adapter
    model, tokenizer = load_base(base_dir)
    before = logits(model, IDS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the right base loads without any warning
        loaded = A.load_adapter(model, tokenizer, path)
    after = logits(loaded, IDS)
    torch.testing.assert_close(after, expected, rtol=0, atol=1e-6)
    assert (after - before).abs().max() > 1e-2


def test_plain_peft_loads_the_adapter(adapter, base_dir):
    from peft import PeftModel

    path, expected = adapter
    model, _ = load_base(base_dir)
    torch.testing.assert_close(logits(PeftModel.from_pretrained(model, str(path)), IDS), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("llama", "field"),
    [({"vocab_size": 420}, "vocab_size"), ({"hidden": 32}, "hidden_size"), ({"layers": 3}, "num_layers"),
     ({"seed": 7}, "embeddings_sha256")],
)
def test_wrong_base_is_refused_naming_the_field(adapter, tmp_path, llama, field):
    path, _ = adapter
    model, tokenizer = load_base(save_base(tmp_path / "other", **llama))
    with pytest.raises(A.AdapterMismatchError, match=field) as info:
        A.load_adapter(model, tokenizer, path)
    assert info.value.fields[0] == field
    assert isinstance(info.value, UserError)
    assert "force" in str(info.value)


def test_other_tokenizer_is_refused(adapter, tmp_path):
    path, _ = adapter
    model, tokenizer = load_base(save_base(tmp_path / "other", tokenizer=build_tokenizer(vocab_size=380)))
    with pytest.raises(A.AdapterMismatchError, match="tokenizer_sha256") as info:
        A.load_adapter(model, tokenizer, path)
    assert info.value.fields == ["tokenizer_sha256"]


def test_force_loads_onto_a_mismatched_base_with_a_warning(adapter, tmp_path):
    path, _ = adapter
    model, tokenizer = load_base(save_base(tmp_path / "other", seed=7))  # same shapes, other weights
    before = logits(model, IDS)
    with pytest.warns(UserWarning, match="embeddings_sha256.*loading anyway"):
        loaded = A.load_adapter(model, tokenizer, path, force=True)
    assert (logits(loaded, IDS) - before).abs().max() > 1e-2


def test_force_cannot_load_tensors_that_do_not_fit(adapter, tmp_path):
    path, _ = adapter
    model, tokenizer = load_base(save_base(tmp_path / "other", hidden=32))
    with pytest.warns(UserWarning, match="hidden_size"), pytest.raises(
        A.AdapterMismatchError, match="adapter_model.safetensors"
    ):
        A.load_adapter(model, tokenizer, path, force=True)


def test_fingerprint_does_not_depend_on_the_peft_wrapper(base_dir):
    model, tokenizer = load_base(base_dir)
    plain = A.fingerprint(model, tokenizer)
    assert A.fingerprint(non_identity_lora(model), tokenizer) == plain
    assert set(plain) == set(A.FINGERPRINT_FIELDS)


# --------------------------------------------------------------------------------------------
# missing and corrupt files are named
# --------------------------------------------------------------------------------------------


def test_missing_adapter_config_is_named(adapter, base_dir, tmp_path):
    path = copy_adapter(adapter[0], tmp_path / "a")
    (path / "adapter_config.json").unlink()
    model, tokenizer = load_base(base_dir)
    with pytest.raises(A.AdapterError, match=r"adapter_config\.json: missing"):
        A.load_adapter(model, tokenizer, path)


def test_missing_directory_is_named(base_dir, tmp_path):
    model, tokenizer = load_base(base_dir)
    with pytest.raises(A.AdapterError, match="nowhere: no such adapter directory"):
        A.load_adapter(model, tokenizer, tmp_path / "nowhere")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing"])
def test_unreadable_weights_are_named(adapter, base_dir, tmp_path, damage):
    path = copy_adapter(adapter[0], tmp_path / "a")
    weights = path / "adapter_model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "garbage":
        weights.write_bytes(b"this is not a safetensors file")
    else:
        weights.unlink()
    model, tokenizer = load_base(base_dir)
    with pytest.raises(A.AdapterError, match=r"adapter_model\.safetensors: (unreadable|missing)"):
        A.load_adapter(model, tokenizer, path)


def test_corrupt_adapter_config_is_named(adapter, base_dir, tmp_path):
    path = copy_adapter(adapter[0], tmp_path / "a")
    (path / "adapter_config.json").write_text("{not json")
    model, tokenizer = load_base(base_dir)
    with pytest.raises(A.AdapterError, match=r"adapter_config\.json: cannot read it as JSON"):
        A.load_adapter(model, tokenizer, path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("# An adapter\n\nNo front matter here.\n", "no YAML front matter"),
        ("---\nbase_model: x\n", "not closed"),
        ("---\n- a list\n---\n", "not a mapping"),
        ("---\nlibrary_name: peft\n---\n", "no 'qlora_orpo.base' section"),
        ("---\nqlora_orpo:\n  base: {name: x}\n---\n", "no 'qlora_orpo.base.fingerprint'"),
        ("---\nkey: [unclosed\n---\n", "cannot parse"),
    ],
)
def test_card_without_front_matter_is_named(adapter, base_dir, tmp_path, text, message):
    path = copy_adapter(adapter[0], tmp_path / "a")
    (path / "README.md").write_text(text)
    model, tokenizer = load_base(base_dir)
    with pytest.raises(A.AdapterError, match=rf"README\.md: .*{message}"):
        A.load_adapter(model, tokenizer, path)


def test_missing_card_is_named_and_force_loads_without_it(adapter, base_dir, tmp_path):
    path = copy_adapter(adapter[0], tmp_path / "a")
    (path / "README.md").unlink()
    model, tokenizer = load_base(base_dir)
    with pytest.raises(A.AdapterError, match=r"README\.md: missing"):
        A.load_adapter(model, tokenizer, path)
    with pytest.warns(UserWarning, match=r"README\.md: missing"):
        loaded = A.load_adapter(model, tokenizer, path, force=True)
    torch.testing.assert_close(logits(loaded, IDS), adapter[1], rtol=0, atol=1e-6)


def test_resolve_base_prefers_the_recorded_path_then_the_model_spec(adapter, tmp_path, base_dir):
    info = A.read_adapter(adapter[0])
    assert A.resolve_base(info) == str(base_dir)
    # Moved to another machine: no local record beside it; an older card's recorded path is gone.
    moved = A.AdapterInfo(tmp_path / "moved", info.peft_config, json.loads(json.dumps(info.card)))
    moved.card["qlora_orpo"]["base"]["path"] = str(tmp_path / "gone")
    moved.card["qlora_orpo"]["base"]["model"] = str(base_dir)
    assert A.resolve_base(moved) == str(base_dir)
    moved.card["qlora_orpo"]["base"]["model"] = str(tmp_path / "also-gone")
    moved.card["qlora_orpo"]["base"]["name"] = str(tmp_path / "gone-too")
    moved.peft_config["base_model_name_or_path"] = str(tmp_path / "gone-as-well")
    with pytest.raises(A.AdapterError, match="cannot find the base"):
        A.resolve_base(moved)
    assert A.resolve_base(moved, override=str(base_dir)) == str(base_dir)


# --------------------------------------------------------------------------------------------
# chat
# --------------------------------------------------------------------------------------------


def test_chat_with_adapter_compares_base_and_adapter_replies(adapter, capsys):
    from qlora_orpo.cli.chat import main

    rc = main(["--adapter", str(adapter[0]), "--prompt", "hello world", "--max-new-tokens", "6",
               "--compare", "--device", "cpu"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert out.out.count("[base]") == 1 and out.out.count("[adapter]") == 1


def test_chat_reads_prompts_from_stdin_until_eof(base_dir, capsys, monkeypatch):
    import io

    from qlora_orpo.cli.chat import main as chat_main
    from qlora_orpo.recipes import chat

    assert list(chat.read_prompts(io.StringIO("hello\n\n  \nthe quick brown fox"), interactive=False)) == [
        "hello", "the quick brown fox"]
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n\nthe quick brown fox\n"))
    monkeypatch.setattr(chat, "generate_reply", lambda model, tok, messages, settings: f"echo {messages[-1]['content']}")
    rc = chat_main(["--model", str(base_dir), "--device", "cpu"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert out.out.split() == ["echo", "hello", "echo", "the", "quick", "brown", "fox"]


def test_generate_reply_greedy_is_deterministic_and_max_new_tokens_limits(base_dir):
    from qlora_orpo.recipes.chat import GenerationSettings, chat_messages, generate_reply

    model, tokenizer = load_base(base_dir)
    messages = chat_messages("hello world")
    short = GenerationSettings(max_new_tokens=2)
    long = GenerationSettings(max_new_tokens=12)
    assert generate_reply(model, tokenizer, messages, short) == generate_reply(model, tokenizer, messages, short)
    n_short = len(tokenizer(generate_reply(model, tokenizer, messages, short))["input_ids"])
    n_long = len(tokenizer(generate_reply(model, tokenizer, messages, long))["input_ids"])
    assert n_short <= 3 and n_long > n_short


def test_sampling_changes_the_reply_with_the_seed(base_dir):
    from qlora_orpo.recipes.chat import GenerationSettings, chat_messages, generate_reply

    model, tokenizer = load_base(base_dir)
    settings = GenerationSettings(max_new_tokens=12, sample=True, temperature=2.0, top_p=1.0)
    replies = set()
    for seed in range(4):
        torch.manual_seed(seed)
        replies.add(generate_reply(model, tokenizer, chat_messages("hello"), settings))
    assert len(replies) > 1


def test_chat_adapter_on_wrong_base_is_an_error_unless_forced(adapter, tmp_path, capsys):
    from qlora_orpo.cli.chat import main

    other = save_base(tmp_path / "other", seed=7)
    argv = ["--adapter", str(adapter[0]), "--base", str(other), "--prompt", "hi", "--max-new-tokens", "2",
            "--device", "cpu"]
    assert main(argv) == 2
    assert "embeddings_sha256" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="embeddings_sha256"):
        assert main([*argv, "--force"]) == 0


def test_chat_nf4_loads_a_4bit_base_that_passes_the_fingerprint_check(adapter):
    bnb = pytest.importorskip("bitsandbytes")
    from qlora_orpo.recipes.chat import GenerationSettings, chat_messages, generate_reply, load_for_chat

    model, tokenizer = load_for_chat(str(adapter[0]), quant="nf4", device="cpu")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in layers)
    assert isinstance(generate_reply(model, tokenizer, chat_messages("hi"), GenerationSettings(max_new_tokens=2)), str)
    full, _ = load_for_chat(str(adapter[0]), device="cpu")
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in full.modules())


@pytest.mark.parametrize(
    "argv",
    [["--temperature", "0.5"], ["--top-p", "0.5"], ["--compare"], ["--base", "x"]],
)
def test_chat_rejects_flags_that_would_do_nothing(base_dir, argv):
    from qlora_orpo.cli.chat import main

    with pytest.raises(SystemExit) as info:
        main(["--model", str(base_dir), "--prompt", "hi", *argv])
    assert info.value.code == 2


# --------------------------------------------------------------------------------------------
# the embedded model
# --------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_fingerprint_of_the_4bit_training_load_equals_the_float32_load():
    """The card is written from the 4-bit training model and checked against float32 loads."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from qlora_orpo.models.loader import load_model_for_training, load_tokenizer, resolve_model_path

    path = resolve_model_path("embedded")
    quantised, tokenizer, _ = load_model_for_training(OrpoConfig(device="cpu", quant="nf4", lora_r=4))
    expected = A.fingerprint(quantised, tokenizer)
    del quantised
    full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert A.fingerprint(full, load_tokenizer(path)) == expected
    assert expected["vocab_size"] == 49152 and expected["hidden_size"] == 576 and expected["num_layers"] == 30


@pytest.mark.integration
def test_committed_adapter_loads_with_plain_peft_and_changes_the_logits():
    """adapters/smollm2-135m-hh-harmless-orpo/ must exist: this fails (does not skip) until it is committed."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_orpo.models.loader import resolve_model_path

    assert COMMITTED_ADAPTER.is_dir(), f"{COMMITTED_ADAPTER} is missing: train it and commit it (see README)"
    path = resolve_model_path("embedded")
    tokenizer = AutoTokenizer.from_pretrained(path)
    messages = [{"role": "user", "content": "How do I pick a lock?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(path)
    before = logits(base, ids)
    model = PeftModel.from_pretrained(base, str(COMMITTED_ADAPTER))  # plain peft, not qlora_orpo's loader
    after = logits(model, ids)
    assert (after - before).abs().max() > 1e-3
    config = json.loads((COMMITTED_ADAPTER / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == A.EMBEDDED_HUB_ID
    # and its card's fingerprint is that of the embedded base
    card = A.read_adapter(COMMITTED_ADAPTER).card
    with model.disable_adapter():
        assert A.fingerprint(model, tokenizer) == card["qlora_orpo"]["base"]["fingerprint"]
