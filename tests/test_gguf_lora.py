"""Tests of qlora_orpo.export.gguf_lora: LoRA adapters as llama.cpp adapter GGUFs.

A tiny random Llama (tied embeddings, rotary q/k permutation) and Qwen2 (untied, no
permutation), each with a non-identity LoRA on q/k/v/o and the MLP. The export verifies itself
(structurally always, with llama.cpp when llama-cpp-python is installed); these tests read the
file back on their own, mutate the export to see the checks fail, and cover the refusals.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_llama, build_tokenizer
from test_gguf_export import build_qwen2_tokenizer, build_tiny_qwen2

from qlora_orpo.config import OrpoConfig
from qlora_orpo.export import adapters as A
from qlora_orpo.export import gguf as G
from qlora_orpo.export import gguf_lora as L
from qlora_orpo.export import gguf_lora_check as C
from qlora_orpo.export.gguf_llamacpp import llama_cpp_available
from qlora_orpo.export.verify import ExportError, ExportVerificationError

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GGUF_NAMES = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
LLAMA_CPP = llama_cpp_available()


def save_base(root: Path, model, tokenizer) -> Path:
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    return root / "base"


def make_adapter(base: Path, out: Path, **lora) -> tuple[Path, object]:
    """A non-identity adapter (B random, not zero) on ``base``, saved with its card; and the peft model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(1)
    options = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "init_lora_weights": False, **lora}
    peft_model = get_peft_model(model, LoraConfig(**options)).eval()
    adapter = A.save_adapter(peft_model, AutoTokenizer.from_pretrained(base),
                             OrpoConfig(model=str(base), eval_fraction=0.0), out)
    return Path(adapter), peft_model


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    out = {}
    # Both with the Qwen2 split regex (llama.cpp's 'qwen2' pre-tokenizer): the tiny byte-level
    # tokenizer's pre name is issue 21 item 0's (gguf_vocab), and llama.cpp is fed token ids here.
    for arch, model, tokenizer in (("llama", build_tiny_llama(tie=True), build_qwen2_tokenizer()),
                                   ("qwen2", build_tiny_qwen2(), build_qwen2_tokenizer())):
        root = tmp_path_factory.mktemp(arch)
        base = save_base(root, model, tokenizer)
        adapter, peft_model = make_adapter(base, root / "adapter")
        # The base GGUF in f32, so that llama.cpp's comparison with peft float32 is tight.
        result = L.export_gguf_lora(adapter, root / "lora", base_quant="f32")
        out[arch] = {"root": root, "base": base, "adapter": adapter, "peft": peft_model, "result": result}
    return out


def read(path: str):
    import gguf

    reader = gguf.GGUFReader(path)
    return reader.fields, {t.name: t for t in reader.tensors}


# --------------------------------------------------------------------------------------------
# the file
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_metadata_names_shapes_and_types(cases, arch):
    import gguf

    result = cases[arch]["result"]
    fields, tensors = read(result.path)
    assert fields["general.type"].contents() == "adapter" and fields["adapter.type"].contents() == "lora"
    assert fields["general.architecture"].contents() == arch
    assert fields[G.OURS_KEY].contents() == "adapter"  # the adapter's directory name, never a local path
    assert fields["adapter.lora.alpha"].contents() == pytest.approx(8.0) and result.alpha == 8.0
    expected = {f"blk.{i}.{n}.weight.lora_{ab}" for i in range(2) for n in GGUF_NAMES for ab in "ab"}
    assert set(tensors) == expected and result.pairs == 14 and result.ranks == [4]
    config = cases[arch]["peft"].config
    head_dim = config.hidden_size // config.num_attention_heads
    q_a, q_b = tensors["blk.0.attn_q.weight.lora_a"], tensors["blk.1.attn_k.weight.lora_b"]
    assert list(q_a.shape) == [config.hidden_size, 4]  # ggml ne: [in, r]
    assert list(q_b.shape) == [4, config.num_key_value_heads * head_dim]  # [r, out]
    assert list(tensors["blk.0.ffn_down.weight.lora_a"].shape) == [config.intermediate_size, 4]
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in tensors.values())
    assert result.bytes == Path(result.path).stat().st_size < 200_000  # 2 x 14 small matrices, F32
    assert result.judge == ("llama.cpp" if LLAMA_CPP else "structural")
    assert result.structural_max_diff is not None and result.structural_max_diff < C.STRUCTURE_RTOL


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_b_rows_are_permuted_for_llama_only(cases, arch):
    case = cases[arch]
    _, tensors = read(case["result"].path)
    layer = case["peft"].base_model.model.model.layers[0].self_attn.q_proj
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    heads = case["peft"].config.num_attention_heads
    stored_a = torch.from_numpy(tensors["blk.0.attn_q.weight.lora_a"].data.copy())
    stored_b = torch.from_numpy(tensors["blk.0.attn_q.weight.lora_b"].data.copy())
    assert torch.equal(stored_a, a)
    assert torch.equal(stored_b, G.permute_qk(b, heads) if arch == "llama" else b)
    assert not torch.equal(G.permute_qk(b, heads), b)  # the permutation is not a no-op on these shapes


def test_the_structural_check_catches_a_wrong_permutation(cases, tmp_path, monkeypatch):
    case = cases["llama"]
    monkeypatch.setattr(L, "permute_qk", lambda weight, n_head: weight)
    with pytest.raises(ExportVerificationError, match="attn_q.*differs from peft's delta weight"):
        L.export_gguf_lora(case["adapter"], tmp_path / "x.gguf", base_gguf=case["result"].base_gguf)
    assert list(tmp_path.iterdir()) == []  # nothing published, no temp file left


def test_the_structural_check_catches_a_wrong_scale_and_a_missing_pair(cases, tmp_path):
    case = cases["qwen2"]
    fields, tensors = read(case["result"].path)
    arrays = {name: t.data.copy() for name, t in tensors.items()}
    config = case["peft"].config
    L.write_gguf_lora(tmp_path / "a.gguf", arrays, "qwen2", 16.0, "x", "x")  # alpha doubled
    with pytest.raises(ExportVerificationError, match="differs from peft's delta weight"):
        C.check_structure(tmp_path / "a.gguf", case["peft"], config, "qwen2")
    del arrays["blk.1.ffn_up.weight.lora_b"]
    L.write_gguf_lora(tmp_path / "b.gguf", arrays, "qwen2", 8.0, "x", "x")
    with pytest.raises(ExportVerificationError, match="up_proj is adapted in peft but"):
        C.check_structure(tmp_path / "b.gguf", case["peft"], config, "qwen2")


def test_rslora_scale_is_folded_into_alpha(cases, tmp_path):
    case = cases["qwen2"]
    adapter, peft_model = make_adapter(case["base"], tmp_path / "rs", use_rslora=True, r=8, lora_alpha=6)
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(6 / math.sqrt(8))  # peft's rsLoRA scale
    result = L.export_gguf_lora(adapter, tmp_path / "out", base_gguf=case["result"].base_gguf)
    assert result.alpha == pytest.approx(6 * math.sqrt(8)) and result.ranks == [8]
    assert result.alpha / 8 == pytest.approx(layer.scaling["default"])  # llama.cpp's alpha / r
    assert result.structural_max_diff < C.STRUCTURE_RTOL


def test_a_rank_pattern_under_rslora_is_folded_into_b(cases, tmp_path):
    case = cases["qwen2"]
    adapter, _ = make_adapter(case["base"], tmp_path / "rp", use_rslora=True, rank_pattern={"q_proj": 2})
    result = L.export_gguf_lora(adapter, tmp_path / "out", base_gguf=case["result"].base_gguf)
    assert result.ranks == [2, 4] and result.alpha == pytest.approx(8 * 2)  # the commonest rank (4) sets alpha
    assert result.structural_max_diff < C.STRUCTURE_RTOL  # q_proj's other scale went into its B


@pytest.mark.skipif(not LLAMA_CPP, reason="llama-cpp-python is not installed")
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_llama_cpp_runs_base_plus_adapter_as_peft_does(cases, arch):
    check = cases[arch]["result"].llama_cpp
    assert check is not None and check.base_quant == "f32"
    assert 0 <= check.max_abs_diff <= check.tolerance and check.tokens_compared > 0
    assert check.adapter_effect > 10 * check.tolerance  # a missing or mis-scaled adapter would show
    assert check.top1_agreement > 0.95 and check.greedy_identical >= check.greedy_runs - 1


def test_without_llama_cpp_the_judge_is_structural(cases, tmp_path, monkeypatch):
    case = cases["qwen2"]
    monkeypatch.setattr(L, "llama_cpp_available", lambda: False)
    result = L.export_gguf_lora(case["adapter"], tmp_path / "x.gguf", base_gguf=case["result"].base_gguf)
    assert result.judge == "structural" and result.llama_cpp is None
    assert result.structural_max_diff < C.STRUCTURE_RTOL


@pytest.mark.skipif(not LLAMA_CPP, reason="llama-cpp-python is not installed")
def test_llama_cpp_alone_catches_a_wrong_permutation(cases, tmp_path, monkeypatch):
    case = cases["llama"]
    monkeypatch.setattr(L, "permute_qk", lambda weight, n_head: weight)
    monkeypatch.setattr(L, "check_structure", lambda *args: 0.0)  # the structural judge blindfolded
    with pytest.raises(ExportVerificationError, match="llama.cpp's logits .* differ from peft's"):
        L.export_gguf_lora(case["adapter"], tmp_path / "x.gguf", base_gguf=case["result"].base_gguf)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# refusals
# --------------------------------------------------------------------------------------------


def one_line_refusal(adapter: Path, out: Path, match: str, **kwargs) -> None:
    with pytest.raises(ExportError, match=match) as info:
        L.export_gguf_lora(adapter, out, **kwargs)
    assert len(str(info.value).splitlines()) == 1 and not out.exists()


def test_dora_is_refused_on_one_line(cases, tmp_path):
    adapter, _ = make_adapter(cases["qwen2"]["base"], tmp_path / "dora", use_dora=True)
    one_line_refusal(adapter, tmp_path / "out", "DoRA adapters cannot be llama.cpp adapters")


def test_a_tied_lm_head_and_embeddings_are_refused_on_one_line(cases, tmp_path):
    base = cases["llama"]["base"]
    adapter, _ = make_adapter(base, tmp_path / "head", target_modules=["q_proj", "lm_head"])
    one_line_refusal(adapter, tmp_path / "out", "adapts lm_head, which this base ties to its embeddings")
    adapter, _ = make_adapter(base, tmp_path / "embed", target_modules=["q_proj", "embed_tokens"])
    one_line_refusal(adapter, tmp_path / "out", "adapts the embeddings")


def test_an_untied_lm_head_is_exported_as_output(cases, tmp_path):
    case = cases["qwen2"]
    adapter, _ = make_adapter(case["base"], tmp_path / "head", target_modules=["q_proj", "lm_head"])
    result = L.export_gguf_lora(adapter, tmp_path / "out", base_gguf=case["result"].base_gguf)
    _, tensors = read(result.path)
    assert {"output.weight.lora_a", "output.weight.lora_b"} <= set(tensors)


def test_an_unsupported_architecture_is_refused_before_any_weight_is_loaded(tmp_path, monkeypatch):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    base = save_base(tmp_path, GPT2LMHeadModel(GPT2Config(vocab_size=400, n_embd=32, n_layer=1, n_head=2,
                                                          n_positions=64)), build_tokenizer())
    peft_model = get_peft_model(GPT2LMHeadModel.from_pretrained(base),
                                LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    adapter = A.save_adapter(peft_model, build_tokenizer(), OrpoConfig(model=str(base), eval_fraction=0.0),
                             tmp_path / "adapter")

    def no_weights(*args, **kwargs):
        raise AssertionError("a weight was loaded")

    monkeypatch.setattr("qlora_orpo.models.loader.load_base", no_weights)  # the base's weights, that is
    one_line_refusal(adapter, tmp_path / "out", "architecture 'gpt2' cannot be exported to GGUF")


def test_a_base_gguf_of_another_architecture_is_refused(cases, tmp_path):
    one_line_refusal(cases["llama"]["adapter"], tmp_path / "out", "needs a llama model GGUF",
                     base_gguf=cases["qwen2"]["result"].base_gguf)
    one_line_refusal(cases["llama"]["adapter"], tmp_path / "out", "needs a llama model GGUF",
                     base_gguf=cases["llama"]["result"].path)  # an adapter file is not a base


# --------------------------------------------------------------------------------------------
# Modelfile, the base GGUF, the command line
# --------------------------------------------------------------------------------------------


def test_modelfile_runs_the_adapter_on_the_base_gguf(cases, tmp_path):
    result = cases["qwen2"]["result"]
    lines = Path(result.modelfile).read_text().splitlines()
    assert Path(result.modelfile).parent == Path(result.path).parent
    assert "FROM ./base-f32.gguf" in lines and "ADAPTER ./adapter-f32.gguf" in lines
    assert lines.index("ADAPTER ./adapter-f32.gguf") == lines.index("FROM ./base-f32.gguf") + 1
    assert 'PARAMETER stop "<|im_end|>"' in lines and any(line.startswith('TEMPLATE """') for line in lines)
    assert (Path(result.path).parent / "base-f32.gguf").is_file()
    elsewhere = L.export_gguf_lora(cases["qwen2"]["adapter"], tmp_path / "a.gguf", base_gguf=result.base_gguf)
    text = Path(elsewhere.modelfile).read_text()
    assert f"FROM {Path(result.base_gguf).resolve()}\nADAPTER ./a.gguf\n" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile", "a.gguf"]


def test_the_base_gguf_is_the_base_alone(cases):
    from transformers import AutoModelForCausalLM

    case = cases["llama"]
    base_file = Path(case["result"].base_gguf)
    fields, _ = read(str(base_file))
    assert fields["general.type"].contents() == "model" and fields[G.OURS_KEY].contents() == "none"
    model = AutoModelForCausalLM.from_pretrained(base_file.parent, gguf_file=base_file.name, dtype=torch.float32)
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad(), case["peft"].disable_adapter():
        plain = case["peft"](ids).logits
    assert float((model(ids).logits - plain).abs().max()) < 1e-4  # f32: the base bit for bit


def test_export_command_writes_a_base_gguf_and_an_adapter_gguf(cases, tmp_path, capsys):
    from qlora_orpo.cli.export import main as export_main

    case = cases["qwen2"]
    assert export_main(["--format", "gguf", "--model", str(case["base"]), "--out", str(tmp_path / "base.gguf"),
                        "--quant", "q8_0"]) == 0
    base = json.loads(capsys.readouterr().out)
    assert base["quant"] == "q8_0" and base["check"]["max_abs_diff"] <= base["check"]["tolerance"]
    assert export_main(["--format", "gguf-lora", "--adapter", str(case["adapter"]), "--out", str(tmp_path),
                        "--base-gguf", str(tmp_path / "base.gguf")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["path"] == str(tmp_path / "adapter-f32.gguf") and result["judge"] in ("llama.cpp", "structural")
    assert "FROM ./base.gguf\nADAPTER ./adapter-f32.gguf" in (tmp_path / "Modelfile").read_text()
    if LLAMA_CPP:  # a q8_0 base: llama.cpp's tolerance follows the base file's quant
        assert result["llama_cpp"]["base_quant"] == "q8_0"
    with pytest.raises(SystemExit):
        export_main(["--format", "gguf-lora", "--out", str(tmp_path / "x")])
    assert "--format gguf-lora needs --adapter" in capsys.readouterr().err


def test_finetune_with_export_gguf_lora_writes_base_adapter_and_modelfile(tmp_path):
    from test_train import WORDS, tiny_config

    from qlora_orpo.recipes.finetune import run

    tokenizer = build_qwen2_tokenizer()
    save_base(tmp_path, build_tiny_llama(vocab_size=400), tokenizer)
    rows = [{"prompt": f"{WORDS[i % 16]} {WORDS[(3 * i) % 16]}", "chosen": "hello world", "rejected": "the lazy dog"}
            for i in range(20)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert OrpoConfig(export="gguf-lora").export == "gguf-lora"
    run(tiny_config(tmp_path, tmp_path / "base", tmp_path / "pairs.jsonl", max_steps=2, save_every=0,
                    export="gguf-lora", gguf_quant="f32"))
    out = tmp_path / "runs" / "t" / "gguf-lora"
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "adapter-f32.gguf", "base-f32.gguf"]
    fields, tensors = read(str(out / "adapter-f32.gguf"))
    assert fields["general.type"].contents() == "adapter" and "blk.1.ffn_down.weight.lora_b" in tensors
