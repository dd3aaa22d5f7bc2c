"""``--chat-template NAME|FILE`` and ``--system-prompt``: labels, stop tokens, the adapter's tokenizer, export, chat."""

from __future__ import annotations

import json

import pytest
from families import FAMILIES
from userfeatures import pair_rows, train_flags, write_jsonl

from qlora_orpo.cli import main
from qlora_orpo.core.errors import ConfigError
from qlora_orpo.data.chat_templates import TEMPLATES, apply_chat_template
from qlora_orpo.data.preferences import PreferencePair
from qlora_orpo.data.templating import ChatFormat, stop_token_ids, tokenize_pair

# built-in template -> a family whose tokenizer has its tokens (tests/families.py), and the reply's last token
CASES = {"chatml": ("qwen2", "<|im_end|>"), "llama3": ("llama3", "<|eot_id|>"), "gemma": ("gemma2", "<end_of_turn>"),
         "mistral": ("mistral", "</s>"), "phi3": ("phi3", "<|end|>"), "zephyr": ("plain", "</s>")}
PAIR = PreferencePair(({"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital?"}),
                      "Paris is the capital.", "I can't help.", 1, "pairs.jsonl")


def base_tokenizer(family: str):
    """The family's tokenizer as a base checkpoint ships it: the special tokens, no chat template."""
    tokenizer = FAMILIES[family].build_tokenizer()
    tokenizer.chat_template = None
    return tokenizer


def test_every_builtin_is_tested():
    assert set(CASES) == set(TEMPLATES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_builtin_template_labels_up_to_its_end_of_turn_and_stops_there(name):
    family, end = CASES[name]
    tokenizer = base_tokenizer(family)
    assert ChatFormat.of(tokenizer).templated is False
    apply_chat_template(tokenizer, name)
    end_id = tokenizer.convert_tokens_to_ids(end)
    tokenized, info = tokenize_pair(PAIR, tokenizer, max_length=256, max_prompt_length=128)
    assert tokenized.chosen_ids[-1] == end_id and tokenized.rejected_ids[-1] == end_id
    assert tokenizer.decode(list(tokenized.chosen_ids[:-1])).strip() == "Paris is the capital."
    assert end_id in stop_token_ids(tokenizer) and tokenizer.eos_token_id in stop_token_ids(tokenizer)
    prompt = tokenizer.decode(list(tokenized.prompt_ids), skip_special_tokens=False)
    assert "Be brief." in prompt  # kept, or folded into the user turn (gemma, mistral refuse a system role)
    assert info["system_folded"] == int(name in ("gemma", "mistral"))


def test_a_token_in_the_vocabulary_but_not_special_is_marked_special_without_growing_it():
    from conftest import build_tokenizer

    tokenizer = build_tokenizer(chat_template=False)
    tokenizer.add_tokens(["<|eot_id|>"])  # a plain added token, as some base checkpoints have it
    size = len(tokenizer)
    apply_chat_template(tokenizer, "llama3")
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert len(tokenizer) == size and ChatFormat.of(tokenizer).end_ids == (eot,) and eot in stop_token_ids(tokenizer)


def test_a_template_whose_end_of_turn_the_vocabulary_lacks_is_refused_naming_it():
    with pytest.raises(ConfigError, match=r"chat_template: gemma ends a reply with '<end_of_turn>'"):
        apply_chat_template(base_tokenizer("llama3"), "gemma")
    with pytest.raises(ConfigError, match="neither a built-in template"):
        apply_chat_template(base_tokenizer("llama3"), "llama-3")


def test_a_jinja_file_may_declare_its_end_of_turn(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{# end_of_turn: <|eot_id|> #}" + TEMPLATES["llama3"].text)
    tokenizer = base_tokenizer("llama3")
    assert apply_chat_template(tokenizer, str(path)).end_of_turn == "<|eot_id|>"
    tokenized, _ = tokenize_pair(PAIR, tokenizer, max_length=256, max_prompt_length=128)
    assert tokenized.chosen_ids[-1] == tokenizer.convert_tokens_to_ids("<|eot_id|>")


@pytest.fixture(scope="module")
def llama3_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("templates")
    tokenizer = base_tokenizer("llama3")
    FAMILIES["llama3"].build_model(tokenizer).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rows = pair_rows(16)
    rows[0]["prompt"] = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "hello"}]
    return {"root": root, "model": root / "model", "data": write_jsonl(root / "pairs.jsonl", rows)}


def test_train_with_llama3_on_a_base_without_template_then_export_and_chat_use_it(llama3_base, capsys, monkeypatch):
    from transformers import AutoTokenizer

    import qlora_orpo.data.templating as templating
    from qlora_orpo.export.adapters import read_adapter
    from qlora_orpo.export.gguf import export_gguf
    from qlora_orpo.export.merged import export_merged
    from qlora_orpo.recipes.chat import load_for_chat

    root = llama3_base["root"]
    flags = [*train_flags(llama3_base["model"], llama3_base["data"], root / "runs"), "--chat-template", "llama3",
             "--system-prompt", "Be brief.", "--max-length", "64"]
    assert main(["dry-run", *flags, "--show-examples", "16"]) == 0
    shown = capsys.readouterr().out
    assert "template:  chat template; replies end with '<|eot_id|>' (--chat-template llama3)" in shown
    assert shown.count("<|eot_id|>]]") == 32  # every chosen and rejected span of the 16 pairs
    assert shown.count("system<|end_header_id|>\n\nBe brief.") == 2 * 15  # not in the row with its own system turn
    assert "Answer in French." in shown

    assert main(["train", *flags, "--max-steps", "2", "--eval-fraction", "0", "--save-every", "0"]) == 0
    adapter = root / "runs" / "t" / "adapter"
    saved = AutoTokenizer.from_pretrained(adapter)
    assert saved.chat_template == TEMPLATES["llama3"].text and "<|eot_id|>" in saved.all_special_tokens

    result = export_merged(adapter, root / "merged")
    assert result.max_abs_diff <= result.tolerance
    assert AutoTokenizer.from_pretrained(root / "merged").chat_template == TEMPLATES["llama3"].text
    _, tokenizer = load_for_chat(adapter=str(adapter), device="cpu")
    assert tokenizer.convert_tokens_to_ids("<|eot_id|>") in stop_token_ids(tokenizer)
    card = json.dumps(read_adapter(adapter).card)
    assert '"chat_template": "llama3"' in card and '"system_prompt": "Be brief."' in card

    # qlora-orpo eval reads the adapter's tokenizer: the pairs end with <|eot_id|> as in training.
    seen, tokenize = [], templating.tokenize_pairs
    monkeypatch.setattr(templating, "tokenize_pairs",
                        lambda pairs, tok, *a, **k: seen.append(tok) or tokenize(pairs, tok, *a, **k))
    assert main(["eval", "--adapter", str(adapter), "--eval-data", str(llama3_base["data"]), "--json", "-",
                 "--no-progress", "--health-prompts", "0", "--quant", "none", "--compute-dtype", "float32"]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["chat_template"] == "llama3"
    assert seen[0].chat_template == TEMPLATES["llama3"].text

    gguf = export_gguf(adapter, root / "gguf", "f32")  # the Modelfile speaks the chosen template
    modelfile = (root / "gguf" / "Modelfile").read_text()
    assert gguf.end_of_turn == "<|eot_id|>" and 'PARAMETER stop "<|eot_id|>"' in modelfile
    assert "<|start_header_id|>assistant<|end_header_id|>" in modelfile and 'SYSTEM """Be brief."""' in modelfile


def test_without_the_flag_the_tokenizers_own_template_is_used_and_no_tokenizer_is_saved(llama3_base):
    root = llama3_base["root"]
    out = root / "plain-runs"
    assert main(["train", *train_flags(llama3_base["model"], llama3_base["data"], out), "--max-steps", "1",
                 "--eval-fraction", "0", "--save-every", "0"]) == 0
    assert not (out / "t" / "adapter" / "tokenizer_config.json").exists()
