"""Tests of qlora_orpo.export.gguf: a tiny random Llama (tied embeddings) and Qwen2 (untied, q/k/v
biases, EOS different from the end-of-turn token), each with a non-identity adapter, exported to
every quant type and read back with transformers' own GGUF reader.

The exporter verifies itself in a ``python -I`` subprocess against the merged model; these tests
add independent checks: the GGUF read back in this process against base + *unmerged* adapter
(peft), the tensor types and names in the file, the tokenizer on a mixed text, the Modelfile.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import CORPUS, build_tiny_llama, build_tokenizer

from qlora_orpo.bench.tiny import CHAT_TEMPLATE
from qlora_orpo.config import OrpoConfig
from qlora_orpo.core.errors import ConfigError
from qlora_orpo.export import adapters as A
from qlora_orpo.export import gguf as G
from qlora_orpo.export import gguf_verify as GV
from qlora_orpo.export import gguf_vocab as V
from qlora_orpo.export import merged as E

IDS = [[5, 17, 42, 99, 7, 3, 250, 11, 64, 1], [2, 300, 8, 8, 120, 33, 4]]
# The plain types; the mixes (q6_k ... q4_0) have their own tests with rows their blocks divide
# (tests/test_gguf_kquants.py): on these 64-wide models nearly every K-quant would fall back.
QUANTS = ("f32", "f16", "q8_0")


def build_qwen2_tokenizer():
    """Byte-level BPE with Qwen2's split regex, EOS ``<|endoftext|>`` and a ChatML template (ends turns with ``<|im_end|>``)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(V.QWEN2_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=380, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, rope_theta=1000000.0)
    return Qwen2ForCausalLM(config).float()


def make_case(root: Path, model, tokenizer) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    base = AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(root / "base")
    torch.manual_seed(1)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                 init_lora_weights=False)).eval()
    with torch.no_grad():
        reference = [peft_model(torch.tensor([ids])).logits[0] for ids in IDS]
        with peft_model.disable_adapter():
            plain = [peft_model(torch.tensor([ids])).logits[0] for ids in IDS]
    adapter = A.save_adapter(peft_model, tokenizer, OrpoConfig(model=str(root / "base"), eval_fraction=0.0),
                             root / "adapter")
    return {"root": root, "adapter": adapter, "tokenizer": tokenizer, "reference": reference, "plain": plain}


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return {
        "llama": make_case(tmp_path_factory.mktemp("llama"), build_tiny_llama(tie=True), build_tokenizer()),
        "qwen2": make_case(tmp_path_factory.mktemp("qwen2"), build_tiny_qwen2(), build_qwen2_tokenizer()),
    }


@pytest.fixture(scope="module")
def exports(cases):
    """Every (architecture, quant) exported once; the export verifies itself or raises."""
    return {(arch, quant): G.export_gguf(case["adapter"], case["root"] / quant, quant)
            for arch, case in cases.items() for quant in QUANTS}


def read_gguf(path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = Path(path).parent, Path(path).name
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(directory, gguf_file=name)


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


# --------------------------------------------------------------------------------------------
# read back and compare
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("quant", QUANTS)
def test_gguf_reads_back_as_base_plus_adapter(cases, exports, arch, quant):
    result, case = exports[(arch, quant)], cases[arch]
    assert Path(result.path).name == f"model-{quant}.gguf" and result.bytes == Path(result.path).stat().st_size
    model, _ = read_gguf(result.path)
    with torch.no_grad():
        logits = [model(torch.tensor([ids])).logits[0] for ids in IDS]
    scale = max(float(r.abs().max()) for r in case["reference"])
    assert max_diff(logits, case["reference"]) <= GV.gguf_tolerance(quant, scale)
    if quant == "f32":  # the merged weights bit for bit: only float32 summation order differs
        assert max_diff(logits, case["reference"]) < 1e-4 and result.check.max_abs_diff < 1e-5
    assert max_diff(logits, case["plain"]) > 10 * GV.gguf_tolerance("f32", scale)  # the adapter is in there
    check = result.check
    assert 0 <= check.max_abs_diff <= check.tolerance and check.tokens_compared > 0
    assert check.top1_agreement > 0.8 and check.greedy_runs == E.VERIFY_PROMPTS
    assert check.adapter_effect > check.tolerance  # the check could see a missing adapter


def test_file_sizes_follow_the_quant_type(exports):
    for arch in ("llama", "qwen2"):
        sizes = [exports[(arch, q)].bytes for q in QUANTS]
        assert sizes[0] > sizes[1] > sizes[2], (arch, sizes)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tensor_names_types_and_tied_embeddings(exports, arch):
    import gguf

    reader = gguf.GGUFReader(exports[(arch, "q8_0")].path)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert "token_embd.weight" in types and "blk.1.attn_q.weight" in types and "output_norm.weight" in types
    assert ("output.weight" in types) == (arch == "qwen2")  # llama is tied: token_embd only, nothing lost
    assert ("blk.0.attn_q.bias" in types) == (arch == "qwen2")
    F = gguf.GGMLQuantizationType
    assert all(t == F.F32 for n, t in types.items() if "norm" in n or n.endswith(".bias"))
    assert types["blk.0.ffn_down.weight"] == F.Q8_0 and types["token_embd.weight"] == F.Q8_0
    fields = reader.fields
    assert fields["general.architecture"].contents() == arch
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.pre"].contents() == {"llama": "gpt-2", "qwen2": "qwen2"}[arch]
    recorded = fields["qlora_orpo.adapter"].contents()  # the adapter by name: a shared file leaks no local path
    assert recorded and "/" not in recorded
    model, _ = read_gguf(exports[(arch, "f32")].path)
    assert model.config.tie_word_embeddings == (arch == "llama")


def test_permutation_is_what_transformers_reverses():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.randn(8 * 6, 5)  # 8 heads of dim 6
    reverse = LlamaTensorProcessor(config={"num_attention_heads": 8, "num_key_value_heads": 2})._reverse_permute_weights
    permuted = G.permute_qk(w, 8)
    assert not torch.equal(permuted, w)
    assert torch.equal(torch.from_numpy(reverse(permuted.numpy(), 8, 8)), w)
    assert torch.equal(torch.from_numpy(reverse(G.permute_qk(w, 2).numpy(), 8, 2)), w)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tokenisation_of_a_mixed_text_is_identical(cases, exports, arch):
    tokenizer = cases[arch]["tokenizer"]
    _, read = read_gguf(exports[(arch, "f16")].path)
    text = GV.mixed_text(tokenizer, "<|im_end|>") + " <|im_start|>user\n\t 007 ÉÀ 中文<|im_end|>"
    ours = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert read(text, add_special_tokens=False)["input_ids"] == ours
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in ours  # the special token stayed whole
    assert read.decode(ours) == tokenizer.decode(ours)
    assert read.chat_template == tokenizer.chat_template


def test_a_broken_permutation_fails_verification_and_leaves_nothing(cases, tmp_path, monkeypatch):
    monkeypatch.setattr(G, "permute_qk", lambda weight, n_head: weight)
    with pytest.raises(E.ExportVerificationError, match="differ from the merged model"):
        G.export_gguf(cases["llama"]["adapter"], tmp_path / "x.gguf", "f32")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# Modelfile, refusals, entry points
# --------------------------------------------------------------------------------------------


def test_modelfile_names_the_end_of_turn_token_not_only_eos(exports):
    result = exports[("qwen2", "q8_0")]
    text = Path(result.modelfile).read_text()
    assert result.end_of_turn == "<|im_end|>"
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "<|endoftext|>"' in text
    assert "FROM ./model-q8_0.gguf" in text
    assert 'TEMPLATE """{{ range .Messages }}{{ if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n' in text


def test_modelfile_template_reproduces_the_chat_template_and_its_default_system():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nBe kind.<|im_end|>\n"
                               "{% endif %}" + CHAT_TEMPLATE)
    pieces = V.chat_pieces(tokenizer)
    assert pieces is not None and pieces["default_system"] == "Be kind."
    turns = [("user", "hi"), ("assistant", "hello"), ("user", "bye")]
    messages = [{"role": r, "content": c} for r, c in turns]
    assert V.render_with_pieces(pieces, turns) == tokenizer.apply_chat_template(messages, tokenize=False,
                                                                              add_generation_prompt=True)
    assert 'SYSTEM """Be kind."""' in V.render_modelfile("m.gguf", tokenizer, "<|im_end|>")


def test_a_template_that_is_not_plain_text_around_messages_gets_stop_lines_only():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] | upper }}<|im_end|>{% endfor %}"
    text = V.render_modelfile("m.gguf", tokenizer, V.end_of_turn_token(tokenizer))
    assert "TEMPLATE" not in text.replace("no TEMPLATE", "") and 'PARAMETER stop "<|im_end|>"' in text


def test_an_unsupported_architecture_is_refused_on_one_line(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    base = tmp_path / "base"
    GPT2LMHeadModel(GPT2Config(vocab_size=400, n_embd=32, n_layer=1, n_head=2, n_positions=64)).save_pretrained(base)
    build_tokenizer().save_pretrained(base)
    model = GPT2LMHeadModel.from_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    adapter = A.save_adapter(peft_model, build_tokenizer(), OrpoConfig(model=str(base), eval_fraction=0.0),
                             tmp_path / "adapter")
    with pytest.raises(E.ExportError) as info:
        G.export_gguf(adapter, tmp_path / "out", "f16")
    message = str(info.value)
    assert "architecture 'gpt2'" in message and "supported: llama, mistral, qwen2" in message
    assert len(message.splitlines()) == 1 and not (tmp_path / "out").exists()


def test_an_unknown_pre_tokenizer_is_refused():
    with pytest.raises(V.VocabError, match="pre-tokenizer .*Metaspace.* supported: gpt-2"):
        V.pre_tokenizer_name({"type": "Metaspace", "replacement": "\u2581"})


def test_a_file_that_is_not_our_export_is_not_overwritten(cases, tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"mine")
    with pytest.raises(E.ExportError, match="not an earlier GGUF export"):
        G.export_gguf(cases["llama"]["adapter"], tmp_path / "model.gguf", "f16")
    assert (tmp_path / "model.gguf").read_bytes() == b"mine"


def test_an_earlier_export_and_its_modelfile_are_replaced(cases, tmp_path):
    first = G.export_gguf(cases["llama"]["adapter"], tmp_path / "m.gguf", "f16", verify=False)
    second = G.export_gguf(cases["llama"]["adapter"], tmp_path / "m.gguf", "q8_0", verify=False)
    assert second.check is None and second.bytes == (tmp_path / "m.gguf").stat().st_size < first.bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile", "m.gguf"]


def test_export_script_writes_gguf(cases, tmp_path, capsys):
    out = tmp_path / "smol.gguf"
    from qlora_orpo.cli.export import main as export_main

    rc = export_main(["--adapter", str(cases["llama"]["adapter"]), "--out", str(out), "--format", "gguf",
                 "--quant", "q8_0"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    result = json.loads(captured.out)
    assert result["path"] == str(out) and result["quant"] == "q8_0" and out.is_file()
    assert result["check"]["max_abs_diff"] <= result["check"]["tolerance"] and (tmp_path / "Modelfile").is_file()


def test_config_export_is_a_choice_and_accepts_old_booleans():
    assert OrpoConfig(export=True).export == "merged" and OrpoConfig(export=False).export == "none"
    assert OrpoConfig(export="gguf", gguf_quant="q8_0").gguf_quant == "q8_0"
    with pytest.raises(ConfigError, match="export: 'yes please' is not one of none, merged, gguf, gguf-lora"):
        OrpoConfig(export="yes please")
    with pytest.raises(ConfigError, match="gguf_quant"):
        OrpoConfig(gguf_quant="q4_k")


def test_finetune_with_export_gguf_writes_the_file_and_modelfile(tmp_path):
    from test_train import WORDS, tiny_config

    from qlora_orpo.recipes.finetune import run

    tokenizer = build_tokenizer()
    build_tiny_llama(vocab_size=len(tokenizer)).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    rows = [{"prompt": f"{WORDS[i % 16]} {WORDS[(3 * i) % 16]}", "chosen": "hello world", "rejected": "the lazy dog"}
            for i in range(20)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_config(tmp_path, tmp_path / "base", tmp_path / "pairs.jsonl", max_steps=2, save_every=0,
                      export="gguf", gguf_quant="q8_0")
    run(cfg)
    gguf_dir = tmp_path / "runs" / "t" / "gguf"
    assert sorted(p.name for p in gguf_dir.iterdir()) == ["Modelfile", "t-q8_0.gguf"]
    assert 'PARAMETER stop "<|im_end|>"' in (gguf_dir / "Modelfile").read_text()
