"""llama.cpp as the judge of GGUF exports (qlora_orpo.export.gguf_llamacpp) and llama.cpp's tokenizer names.

Tiny random models, each with its own byte-level tokenizer and template: a tied Llama with a
GPT-2 style tokenizer (pre ``gpt-2``), a Llama 3 style one (``llama-bpe``, BOS added by the
tokenizer and written by the template) and a Qwen2 (``qwen2``, ChatML). Each export is judged
by llama.cpp in the exporter's subprocess; these tests load the files in llama.cpp once more
in-process and check what the judge claims. One integration test exports the embedded SmolLM2
with the committed adapter. Tests that need llama.cpp skip only when ``llama_cpp`` is not
importable (``pip install qlora_orpo[gguf]``); the rest run everywhere.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import CORPUS, build_tiny_llama, build_tokenizer
from gguf_family_cases import FAMILIES
from gguf_family_cases import make_case as family_case_for
from test_gguf_export import build_qwen2_tokenizer, build_tiny_qwen2, make_case

from qlora_orpo.export import gguf as G
from qlora_orpo.export import gguf_llamacpp as J
from qlora_orpo.export import gguf_pre as P
from qlora_orpo.export import gguf_verify as GV
from qlora_orpo.export import gguf_vocab as V
from qlora_orpo.export import merged as E

HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not HAVE_LLAMA_CPP, reason="llama_cpp is not importable "
                                     "(pip install 'qlora_orpo[gguf]', which make test's set-up installs)")
REPO = Path(__file__).resolve().parents[1]
COMMITTED_ADAPTER = REPO / "adapters" / "smollm2-135m-hh-harmless-orpo"
LLAMA3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                   "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def build_llama3_tokenizer(template: str = LLAMA3_TEMPLATE):
    """Byte-level BPE with Llama 3's split regex; adds ``<|begin_of_text|>`` itself, as Llama 3's does."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(V.LLAMA3_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    core.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    trainer = trainers.BpeTrainer(vocab_size=380, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(CORPUS, trainer=trainer)
    core.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", core.token_to_id("<|begin_of_text|>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|begin_of_text|>",
                                        eos_token="<|eot_id|>", pad_token="<|end_of_text|>")
    tokenizer.chat_template = template
    return tokenizer


def build_case(root: Path, arch: str) -> dict:
    if arch == "llama":
        return make_case(root, build_tiny_llama(tie=True), build_tokenizer())
    if arch == "llama3":
        tokenizer = build_llama3_tokenizer()
        ids = tokenizer.convert_tokens_to_ids(["<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>"])
        model = build_tiny_llama(bos_token_id=ids[0], eos_token_id=ids[1], pad_token_id=ids[2])
        return make_case(root, model, tokenizer)
    return make_case(root, build_tiny_qwen2(), build_qwen2_tokenizer())


ARCHS = ("llama", "llama3", "qwen2")


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return {arch: build_case(tmp_path_factory.mktemp(arch), arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def judged(cases):
    """Every tiny family exported to every quant; with llama.cpp installed, each file judged by it."""
    if not HAVE_LLAMA_CPP:
        pytest.skip("llama_cpp is not importable (pip install 'qlora_orpo[gguf]')")
    return {(arch, quant): G.export_gguf(case["adapter"], case["root"] / quant, quant)
            for arch, case in cases.items() for quant in G.QUANTS}


def load_in_llamacpp(path: str, **kwargs):
    import llama_cpp

    return llama_cpp.Llama(model_path=path, n_ctx=256, verbose=False, seed=0, **kwargs)


# --------------------------------------------------------------------------------------------
# tokenizer.ggml.pre: llama.cpp's names (no llama.cpp needed)
# --------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_the_embedded_smollm2_tokenizer_is_named_smollm_by_its_check_hash():
    from transformers import AutoTokenizer

    from qlora_orpo.models.loader import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("embedded"))
    assert P.check_hash(tokenizer) == "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249"
    assert P.pre_name_by_hash(tokenizer) == "smollm"
    assert V.build_vocab(tokenizer, len(tokenizer)).pre == "smollm"
    # The conversion kept SmolLM2's digit split (transformers' GGUF reader drops it), so the
    # tokenizer.json spec names it smollm too; the plain ByteLevel it had before would read gpt-2.
    import json

    assert V.pre_tokenizer_name(json.loads(tokenizer.backend_tokenizer.to_str())["pre_tokenizer"]) == "smollm"


@needs_llama_cpp
@pytest.mark.integration
def test_the_embedded_tokenizer_splits_text_as_smollm2s_own_gguf_does_in_llama_cpp():
    """The conversion keeps SmolLM2's digit split (transformers' GGUF reader drops it): whitespace before
    digits (``\\r\\n1``, two spaces then a digit) gets SmolLM2's ids, the ones llama.cpp's ``smollm`` gives."""
    from transformers import AutoTokenizer

    from qlora_orpo.models.embedded import embedded_gguf_path
    from qlora_orpo.models.loader import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("embedded"))
    text = GV.mixed_text(tokenizer, "<|im_end|>") + " a  12 b\t\t3 c\n\n4 d\r\n5"
    ours = tokenizer(text, add_special_tokens=False)["input_ids"]
    llm = load_in_llamacpp(str(embedded_gguf_path()), vocab_only=True)
    assert llm.metadata["tokenizer.ggml.pre"] == "smollm"
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ours
    assert tokenizer("\r\n1", add_special_tokens=False)["input_ids"][-1] == tokenizer.convert_tokens_to_ids("1")
    assert len(tokenizer("\r\n1", add_special_tokens=False)["input_ids"]) == 2  # one \r\n token, not \r and \n


def test_tiny_tokenizers_fall_back_to_the_names_llama_cpp_knows():
    for tokenizer, name in ((build_tokenizer(), "gpt-2"), (build_llama3_tokenizer(), "llama-bpe"),
                            (build_qwen2_tokenizer(), "qwen2")):
        assert P.pre_name_by_hash(tokenizer) is None  # trained here, in no table
        assert V.build_vocab(tokenizer, 400).pre == name
    assert "gpt2" not in V.PRE_NAMES and set(V.PRE_NAMES) <= set(P.KNOWN_HASHES.values())


def test_the_check_text_is_llama_cpps_character_for_character():
    """A changed character changes every hash; these are its landmarks (ZWJ emoji, Khmer, 4 double quotes)."""
    assert "😶\u200d🌫️" in P.CHECK_TEXT and "កាន់តែពិសេសអាច😁" in P.CHECK_TEXT
    assert "''''''```````\"\"\"\"......" in P.CHECK_TEXT and P.CHECK_TEXT.endswith("We'Ve a'lL")
    assert len(P.CHECK_TEXT) == 350


# --------------------------------------------------------------------------------------------
# the judge: every tiny family and quant loaded and compared by llama.cpp
# --------------------------------------------------------------------------------------------


@needs_llama_cpp
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("quant", G.QUANTS)
def test_llama_cpp_judged_every_export(judged, cases, arch, quant):
    check = judged[(arch, quant)].check
    assert check.judge.startswith("llama.cpp (llama-cpp-python ")
    assert 0 <= check.max_abs_diff <= check.tolerance and check.tokens_compared > 0
    assert check.greedy_runs == E.VERIFY_PROMPTS
    if quant in ("f32", "f16", "q8_0"):
        assert check.top1_agreement > 0.8
        assert check.adapter_effect > check.tolerance  # the judge could see a missing adapter
    # 4- to 6-bit mixes on these tiny random models (max|logit| under 1, nearly flat): the file
    # loads, tokenises as training does and stays within its tolerance; the top-1 token flips
    # often (0.53-0.79 measured) and the tolerance is wider than the adapter's effect.
    if quant == "f32":  # the merged weights bit for bit, float32 cache: only summation order differs
        assert check.max_abs_diff < 1e-3 and check.top1_agreement == 1.0


@needs_llama_cpp
@pytest.mark.parametrize("arch", ARCHS)
def test_llama_cpp_reads_our_tokenizer_as_transformers_does(judged, cases, arch):
    """Independent of the judge: this process loads the file and tokenises the mixed text itself."""
    tokenizer = cases[arch]["tokenizer"]
    llm = load_in_llamacpp(judged[(arch, "f16")].path, vocab_only=True)
    end_of_turn = V.end_of_turn_token(tokenizer)
    text = GV.mixed_text(tokenizer, end_of_turn) + " 007 ÉÀ 中文 it's  \n\n  x"
    ours = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ours
    assert llm.metadata["tokenizer.ggml.pre"] == {"llama": "gpt-2", "llama3": "llama-bpe", "qwen2": "qwen2"}[arch]
    assert llm.metadata.get("tokenizer.ggml.add_bos_token") == ("true" if arch == "llama3" else "false")


@needs_llama_cpp
def test_a_pre_tokenizer_name_llama_cpp_refuses_fails_the_export(cases, tmp_path, monkeypatch):
    """Today's old name: the transformers read-back passed it, llama.cpp refuses it and so must the export."""
    build = G.build_any_vocab

    def old_name(tokenizer, vocab_size):
        vocab = build(tokenizer, vocab_size)
        vocab.pre = "gpt2"
        return vocab

    monkeypatch.setattr(G, "build_any_vocab", old_name)
    with pytest.raises(E.ExportVerificationError, match="unknown pre-tokenizer type: 'gpt2'"):
        G.export_gguf(cases["llama"]["adapter"], tmp_path / "x.gguf", "f16")
    assert list(tmp_path.iterdir()) == []


@needs_llama_cpp
def test_what_llama_cpp_warns_about_comes_with_its_verdict(cases, tmp_path, monkeypatch):
    """No pre-tokenizer name: llama.cpp warns and falls back to its default split, which cuts the GPT-2 style
    tokenizer's mixed text differently; the export fails and its message carries llama.cpp's warning."""
    build = G.build_any_vocab

    def no_name(tokenizer, vocab_size):
        vocab = build(tokenizer, vocab_size)
        vocab.pre = ""
        return vocab

    monkeypatch.setattr(G, "build_any_vocab", no_name)
    with pytest.raises(E.ExportVerificationError, match=r"differently .*\(llama.cpp warned: load: missing "
                       r"pre-tokenizer type, using: 'default' \| load: GENERATION QUALITY WILL BE DEGRADED!"):
        G.export_gguf(cases["llama"]["adapter"], tmp_path / "x.gguf", "f16")
    assert list(tmp_path.iterdir()) == []


@needs_llama_cpp
def test_a_broken_permutation_fails_in_llama_cpp(cases, tmp_path, monkeypatch):
    monkeypatch.setattr(G, "permute_qk", lambda weight, n_head: weight)
    with pytest.raises(E.ExportVerificationError, match=r"logits \(llama.cpp .*differ from the merged model"):
        G.export_gguf(cases["llama3"]["adapter"], tmp_path / "x.gguf", "f32")
    assert list(tmp_path.iterdir()) == []


@needs_llama_cpp
@pytest.mark.parametrize("name", FAMILIES)
def test_llama_cpp_judges_every_family_at_f32(tmp_path, name):
    """The other families' files (gguf_families, gguf_spm), verified by the export itself in llama.cpp:
    Llama 3.1 rope_freqs, SentencePiece (the ``first`` scheme compared after a BOS), Gemma's GELU table."""
    case = family_case_for(tmp_path, name)
    check = G.export_gguf(case["adapter"], tmp_path / "m.gguf", "f32").check
    assert check.judge.startswith("llama.cpp") and check.max_abs_diff <= check.tolerance
    assert check.top1_agreement == 1.0 and check.adapter_effect > check.tolerance


def test_llama_cpps_tolerance_adds_its_own_rounding_to_the_files():
    file_q8, file_f16 = GV.gguf_tolerance("q8_0", 2.0), GV.gguf_tolerance("f16", 2.0)
    assert J.llamacpp_tolerance("f32", 2.0, "llama") == GV.gguf_tolerance("f32", 2.0)  # float32 throughout
    f32_part = GV.gguf_tolerance("f32", 2.0)
    assert J.llamacpp_tolerance("q8_0", 2.0, "qwen2") == pytest.approx(f32_part + 2 * (file_q8 - f32_part))
    assert J.llamacpp_tolerance("f16", 2.0, "llama") == pytest.approx(f32_part + 2 * (file_f16 - f32_part))
    gelu = J.llamacpp_tolerance("f32", 2.0, "gemma2") - J.llamacpp_tolerance("f32", 2.0, "llama")
    assert gelu == pytest.approx(file_f16 - f32_part)  # one float16 rounding of the MLP activations


# --------------------------------------------------------------------------------------------
# BOS exactly once: in the GGUF and in the Modelfile
# --------------------------------------------------------------------------------------------


def test_the_modelfile_template_leaves_bos_to_the_file():
    tokenizer = build_llama3_tokenizer()
    with_flag = V.render_modelfile("m.gguf", tokenizer, "<|eot_id|>", add_bos=True)
    assert 'TEMPLATE """{{ range .Messages }}' in with_flag and "<|begin_of_text|>" not in with_flag
    without_flag = V.render_modelfile("m.gguf", tokenizer, "<|eot_id|>", add_bos=False)
    assert 'TEMPLATE """<|begin_of_text|>{{ range .Messages }}' in without_flag


@needs_llama_cpp
def test_the_modelfile_template_plus_the_files_bos_is_what_training_saw(judged, cases):
    """Rendered as Ollama renders the TEMPLATE, tokenised with the file's special tokens added: one BOS."""
    tokenizer = cases["llama3"]["tokenizer"]
    result = judged[("llama3", "f16")]
    text = Path(result.modelfile).read_text()
    assert "<|begin_of_text|>" not in text
    pieces = V.chat_pieces(tokenizer)
    pieces["start"] = pieces["start"].removeprefix(tokenizer.bos_token)  # what the Modelfile holds
    turns = [("user", "hello world"), ("assistant", "the quick brown fox"), ("user", "bread?")]
    trained = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in turns], tokenize=False,
                                            add_generation_prompt=True)
    ids = tokenizer(trained, add_special_tokens=False)["input_ids"]
    llm = load_in_llamacpp(result.path, vocab_only=True)
    runtime = llm.tokenize(V.render_with_pieces(pieces, turns).encode(), add_bos=True, special=True)
    assert runtime == ids and runtime.count(tokenizer.bos_token_id) == 1


@needs_llama_cpp
def test_a_bos_the_template_does_not_write_but_the_file_adds_fails_the_judge(tmp_path):
    """Training rendered without BOS; llama.cpp's chat would add one: the judge names the BOS count."""
    template = LLAMA3_TEMPLATE.removeprefix("{{ bos_token }}")
    tokenizer = build_llama3_tokenizer(template)
    ids = tokenizer.convert_tokens_to_ids(["<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>"])
    case = make_case(tmp_path, build_tiny_llama(bos_token_id=ids[0], eos_token_id=ids[1], pad_token_id=ids[2]),
                     tokenizer)
    with pytest.raises(E.ExportVerificationError, match=r"1 BOS token\(s\) .*training saw 0"):
        G.export_gguf(case["adapter"], tmp_path / "out.gguf", "f32")
    assert not (tmp_path / "out.gguf").exists()


# --------------------------------------------------------------------------------------------
# which judge
# --------------------------------------------------------------------------------------------


def test_without_llama_cpp_the_transformers_read_back_judges_and_says_so(cases, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(J, "llama_cpp_available", lambda: False)
    result = G.export_gguf(cases["qwen2"]["adapter"], tmp_path / "m.gguf", "f16")
    assert result.check.judge == "transformers" and result.to_dict()["check"]["judge"] == "transformers"
    assert 0 <= result.check.max_abs_diff <= result.check.tolerance
    assert "pip install 'qlora_orpo[gguf]'" in capsys.readouterr().err


def test_a_llama_cpp_crash_fails_the_export_not_the_process(cases, tmp_path, monkeypatch):
    """The judge runs in a subprocess: an abort inside llama.cpp is an export error with its last words."""
    monkeypatch.setattr(J, "llama_cpp_available", lambda: True)
    monkeypatch.setattr(J, "LLAMACPP_SCRIPT", "import os, sys; print('ggml_abort: boom', file=sys.stderr); os.abort()")
    with pytest.raises(E.ExportVerificationError, match=r"llama.cpp crashed on the GGUF \(exit -6\): ggml_abort: boom"):
        G.export_gguf(cases["qwen2"]["adapter"], tmp_path / "m.gguf", "f16")
    assert list(tmp_path.iterdir()) == []


@needs_llama_cpp
def test_the_export_command_reports_the_judge(cases, tmp_path, capsys):
    import json

    from qlora_orpo.cli.export import main as export_main

    rc = export_main(["--adapter", str(cases["qwen2"]["adapter"]), "--out", str(tmp_path / "m.gguf"),
                      "--format", "gguf", "--quant", "q8_0"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert json.loads(captured.out)["check"]["judge"].startswith("llama.cpp")
    assert "judged by llama.cpp" in captured.err


# --------------------------------------------------------------------------------------------
# the embedded model, the README's example
# --------------------------------------------------------------------------------------------


@needs_llama_cpp
@pytest.mark.integration
def test_the_embedded_model_exported_to_f16_opens_in_llama_cpp(tmp_path):
    assert COMMITTED_ADAPTER.is_dir(), f"{COMMITTED_ADAPTER} is missing"
    result = G.export_gguf(COMMITTED_ADAPTER, tmp_path / "smol.gguf", "f16")
    check = result.check
    assert check.judge.startswith("llama.cpp") and check.max_abs_diff <= check.tolerance
    assert check.top1_agreement > 0.95 and check.tokens_compared > 50
    llm = load_in_llamacpp(result.path, vocab_only=True)
    assert llm.metadata["tokenizer.ggml.pre"] == "smollm"
    print(f"embedded f16 in llama.cpp: max diff {check.max_abs_diff:.4f} (tolerance {check.tolerance:.3f}), "
          f"top-1 {check.top1_agreement:.4f} of {check.tokens_compared}, greedy {check.greedy_identical}/"
          f"{check.greedy_runs}, warnings {check.warnings}")
    assert torch.isfinite(torch.tensor(check.max_abs_diff))
