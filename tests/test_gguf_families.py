"""GGUF export of the families beyond Llama/Qwen2 (issue 21, item 1): Llama 3.1 (llama3 rope),
Gemma-2, Gemma-3 text, Phi-3 (also longrope), and SentencePiece tokenizers (Llama-2, Mistral,
Gemma, Phi-3 styles).

Each family (:mod:`gguf_family_cases`) is a tiny random model with its own tokenizer and a
non-identity adapter, exported at f32 and q8_0. Checked here: the metadata keys llama.cpp's
loader reads for the architecture, the tensors (names, ``1 + w`` norms, fused Phi-3 projections,
``rope_freqs`` against transformers' llama3 frequencies), the SentencePiece scores/types/byte
tokens, one-line refusals before any weight is loaded, and, where ``llama_cpp`` is importable,
llama.cpp itself: the file loads, tokenises a mixed text and a chat-templated conversation as
transformers does (BOS once), and its logits match the float32 model with the adapter.
"""

from __future__ import annotations

import math

import pytest
import torch
from gguf_family_cases import (
    ARCH,
    FAMILIES,
    PHI3_LONGROPE,
    SIZES,
    TEXTS,
    family_case,
    llama_cpp,
    llama_cpp_check,
    make_case,
)
from test_sentencepiece import LLAMA2_TEMPLATE

from qlora_orpo.export import gguf as G
from qlora_orpo.export import gguf_spm as S
from qlora_orpo.export import gguf_verify as GV
from qlora_orpo.export import gguf_vocab as V
from qlora_orpo.export import merged as E

# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------

QUANTS = ("f32", "q8_0")


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return {name: make_case(tmp_path_factory.mktemp(name), name) for name in FAMILIES}


@pytest.fixture(scope="module")
def exports(cases):
    """Every family at f32 and q8_0, unverified (most of these the transformers reader cannot judge)."""
    return {(name, quant): G.export_gguf(case["adapter"], case["root"] / quant, quant, verify=False)
            for name, case in cases.items() for quant in QUANTS}


def fields(path: str) -> dict:
    import gguf

    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items()}


def tensors(path: str) -> dict[str, torch.Tensor]:
    """The F32 tensors of a GGUF, shaped as in transformers ((out, in) for matrices)."""
    import gguf

    reader = gguf.GGUFReader(path)
    return {t.name: torch.from_numpy(t.data.copy()).reshape(tuple(reversed([int(d) for d in t.shape])))
            for t in reader.tensors if t.tensor_type == gguf.GGMLQuantizationType.F32}


def space_scheme(case: dict) -> str | None:
    return getattr(S.build_any_vocab(case["tokenizer"], case["config"].vocab_size), "space_scheme", None)


# --------------------------------------------------------------------------------------------
# metadata and tensors, as llama.cpp's loader reads them
# --------------------------------------------------------------------------------------------

# Keys llama.cpp's loader requires (ml.get_key without `false`) or that change the graph, per architecture.
COMMON_KEYS = ("context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
               "attention.head_count_kv", "attention.layer_norm_rms_epsilon", "rope.dimension_count", "rope.freq_base")


@pytest.mark.parametrize("name", FAMILIES)
def test_metadata_llama_cpp_reads(exports, cases, name):
    f = fields(exports[(name, "f32")].path)
    arch, config = ARCH[name], cases[name]["config"]
    assert f["general.architecture"] == arch
    for key in COMMON_KEYS:
        assert f"{arch}.{key}" in f, key
    assert f[f"{arch}.block_count"] == 2 and f[f"{arch}.embedding_length"] == 64
    if arch in ("gemma2", "gemma3"):
        assert f[f"{arch}.attention.key_length"] == f[f"{arch}.attention.value_length"] == 16
        assert f[f"{arch}.attention.sliding_window"] == 8
    if arch == "gemma2":
        assert f["gemma2.attn_logit_softcapping"] == pytest.approx(5.0)
        assert f["gemma2.final_logit_softcapping"] == pytest.approx(3.0)
        assert "gemma2.attention.sliding_window_pattern" not in f  # the default alternation: left to llama.cpp
    if arch == "gemma3":
        assert f["gemma3.rope.freq_base"] == pytest.approx(100000.0)
        assert f["gemma3.rope.freq_base_swa"] == pytest.approx(1000.0)
        assert f["gemma3.rope.scaling.type"] == "linear" and f["gemma3.rope.scaling.factor"] == pytest.approx(2.0)
        assert list(f["gemma3.attention.sliding_window_pattern"]) == [True, False]  # not llama.cpp's 5:1 default
        assert "gemma3.final_logit_softcapping" not in f
    if name == "phi3":
        assert f["phi3.rope.dimension_count"] == 12  # int(0.75 * 64) // 4, not head_dim 16
        assert f["phi3.rope.scaling.original_context_length"] == 512 and f["phi3.attention.sliding_window"] == 0
        assert "phi3.rope.scaling.type" not in f
    if name == "phi3long":
        assert f["phi3.rope.scaling.original_context_length"] == 256 and f["phi3.rope.scaling.type"] == "longrope"
        assert f["phi3.rope.scaling.attn_factor"] == pytest.approx(math.sqrt(1 + math.log(2) / math.log(256)))
        stored = tensors(exports[(name, "f32")].path)
        assert stored["rope_factors_long.weight"].tolist() == PHI3_LONGROPE["long_factor"]
        torch.testing.assert_close(stored["rope_factors_short.weight"], torch.tensor(PHI3_LONGROPE["short_factor"]))
    if name == "llama31":
        assert f["llama.rope.freq_base"] == pytest.approx(500000.0) and f["tokenizer.ggml.model"] == "gpt2"
        assert "llama.rope.scaling.type" not in f  # llama3 scaling lives in rope_freqs only, as the converter writes it
    else:
        assert f["tokenizer.ggml.model"] == "llama" and f["tokenizer.ggml.pre"] == "default"
        assert len(f["tokenizer.ggml.scores"]) == len(f["tokenizer.ggml.tokens"]) == config.vocab_size
        expected = {"llama2": True, "phi3": True, "mistral": False, "gemma2": False, "gemma3": False,
                    "phi3long": False}[name]
        assert f["tokenizer.ggml.add_space_prefix"] is expected
    tokenizer = cases[name]["tokenizer"]
    assert f["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert f["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert f["tokenizer.chat_template"] == tokenizer.chat_template


def test_rope_freqs_are_transformers_llama3_frequencies(exports, cases):
    """llama.cpp divides each base frequency by ``rope_freqs``; the result must be transformers' llama3 inv_freq."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = cases["llama31"]["config"]
    got = tensors(exports[("llama31", "f32")].path)["rope_freqs.weight"]
    assert got.shape == (8,) and got.dtype == torch.float32
    assert got[0] == 1 and got[-1] == 8 and ((got > 1) & (got < 8)).any()  # all three regimes of the formula
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    base = 1.0 / (500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    torch.testing.assert_close(base / got, theirs.float(), rtol=1e-6, atol=0)
    # and the converter's own arithmetic, spelled out independently in float64
    wavelen = 2 * math.pi / base.double()
    smooth = (64 / wavelen - 1.0) / (4.0 - 1.0)
    expected = torch.where(wavelen < 16, 1.0, torch.where(wavelen > 64, 8.0, 1 / ((1 - smooth) / 8.0 + smooth)))
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=0)
    assert "rope_freqs.weight" not in tensors(exports[("llama2", "f32")].path)


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_gemma_norms_are_stored_as_one_plus_w(exports, cases, name):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(cases[name]["root"] / "base", dtype=torch.float32)
    stored = tensors(exports[(name, "f32")].path)
    layer = base.model.layers[0]
    pairs = {"blk.0.attn_norm.weight": layer.input_layernorm, "blk.0.post_attention_norm.weight":
             layer.post_attention_layernorm, "blk.0.ffn_norm.weight": layer.pre_feedforward_layernorm,
             "blk.0.post_ffw_norm.weight": layer.post_feedforward_layernorm, "output_norm.weight": base.model.norm}
    if name == "gemma3":
        pairs.update({"blk.0.attn_q_norm.weight": layer.self_attn.q_norm, "blk.0.attn_k_norm.weight": layer.self_attn.k_norm})
    for gguf_name, module in pairs.items():
        torch.testing.assert_close(stored[gguf_name], module.weight.detach() + 1, rtol=0, atol=0)
    assert "output.weight" not in stored  # tied: llama.cpp reuses token_embd


def test_phi3_projections_stay_fused(exports, cases):
    import gguf

    names = {t.name: [int(d) for d in t.shape] for t in gguf.GGUFReader(exports[("phi3", "f32")].path).tensors}
    assert names["blk.0.attn_qkv.weight"] == [64, 64 + 2 * 32]  # q (4 heads) then k, v (2 heads) of 16
    assert names["blk.0.ffn_up.weight"] == [64, 2 * 128]  # gate then up, as llama.cpp's swiglu splits it
    assert not any(n.startswith("blk.0.attn_q.") or n.startswith("blk.0.ffn_gate") for n in names)


# --------------------------------------------------------------------------------------------
# SentencePiece vocabulary
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama2", "mistral", "gemma2", "phi3"])
def test_sentencepiece_tokens_scores_and_types(cases, name):
    tokenizer = cases[name]["tokenizer"]
    vocab = S.build_any_vocab(tokenizer, cases[name]["config"].vocab_size)
    assert isinstance(vocab, S.SpmVocab) and vocab.merges == []
    ids = tokenizer.get_vocab()
    for b in (0x00, 0x0A, 0xFF):
        token_id = ids[f"<0x{b:02X}>"]
        assert vocab.token_types[token_id] == S.BYTE and vocab.scores[token_id] == 0.0
    for special in (tokenizer.bos_token, tokenizer.eos_token, "<unk>"):
        assert vocab.token_types[ids[special]] == V.CONTROL  # special added tokens, as the converter marks them
    pieces = [i for i, t in enumerate(vocab.token_types) if t == V.NORMAL and len(vocab.tokens[i]) > 1]
    assert len(pieces) > 20
    # merged pieces score by merge order: for these tokenizers (as for any converted from SentencePiece) id order
    scores = [vocab.scores[i] for i in sorted(pieces)]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores)


def test_space_schemes_map_to_add_space_prefix():
    spec = lambda normalizer=None, pre=None: {"normalizer": normalizer, "pre_tokenizer": pre}  # noqa: E731
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": S.SPACE}
    prepend = {"type": "Prepend", "prepend": S.SPACE}
    metaspace = lambda scheme: {"type": "Metaspace", "replacement": S.SPACE, "prepend_scheme": scheme, "split": False}  # noqa: E731
    assert S.space_handling(spec({"type": "Sequence", "normalizers": [prepend, replace]})) == (True, "prepend")
    assert S.space_handling(spec(replace)) == (False, "never")
    assert S.space_handling(spec(pre=metaspace("first"))) == (False, "first")
    assert S.space_handling(spec(pre=metaspace("always"))) == (True, "always")
    with pytest.raises(V.VocabError, match="split=true"):
        S.space_handling(spec(pre={**metaspace("always"), "split": True}))
    with pytest.raises(V.VocabError, match="does not write spaces"):
        S.space_handling(spec())


def test_sentencepiece_without_byte_fallback_is_refused_on_one_line():
    from test_sentencepiece import sentencepiece_tokenizer

    tokenizer = sentencepiece_tokenizer(LLAMA2_TEMPLATE, legacy=True)  # BPE with <unk>, no <0xNN> tokens
    with pytest.raises(V.VocabError) as info:
        S.build_any_vocab(tokenizer, len(tokenizer))
    assert "without byte fallback" in str(info.value) and len(str(info.value).splitlines()) == 1


# --------------------------------------------------------------------------------------------
# refusals, before any weight is loaded
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "change", "message"), [
    ("phi3long", {"rope_scaling": {**PHI3_LONGROPE, "attention_factor": 1.5}}, "factor/attention_factor"),
    ("gemma3", {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                    "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}},
     "local-layer rope scaling 'linear'"),
    ("llama2", {"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 256}},
     "rope scaling 'yarn'.*supported: default, llama3"),
    ("gemma2", {"query_pre_attn_scalar": 24}, "query_pre_attn_scalar 24 != head_dim 16"),
    ("gemma3", {"hidden_activation": "silu"}, "activation 'silu'"),
])
def test_unsupported_settings_are_refused_before_loading_weights(tmp_path, monkeypatch, name, change, message):
    import transformers

    from qlora_orpo.models import loader

    config_cls, _, _, kwargs = family_case(name)
    config = getattr(transformers, config_cls)(vocab_size=600, **SIZES, **{**kwargs, **change})
    monkeypatch.setattr(loader, "load_base", lambda *a, **k: pytest.fail("weights loaded before the refusal"))
    with pytest.raises(E.ExportError, match=message) as info:
        G.gguf_arch(config, "base x")
    assert len(str(info.value).splitlines()) == 1


def test_a_family_export_refuses_before_loading_weights(cases, tmp_path, monkeypatch):
    """Export of a refused configuration, end to end: one line, no weights read, nothing written."""
    import json

    from qlora_orpo.models import loader

    base = cases["llama31"]["root"] / "base"
    config = json.loads((base / "config.json").read_text())
    bad = tmp_path / "base"
    bad.mkdir()
    for item in base.iterdir():
        (bad / item.name).write_bytes(item.read_bytes())
    (bad / "config.json").write_text(json.dumps({**config, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}))
    monkeypatch.setattr(loader, "load_base", lambda *a, **k: pytest.fail("weights loaded before the refusal"))
    with pytest.raises(E.ExportError, match="rope scaling 'dynamic'") as info:
        G.export_gguf(cases["llama31"]["adapter"], tmp_path / "out", "f16", base=str(bad), force=True)
    assert len(str(info.value).splitlines()) == 1 and not (tmp_path / "out").exists()


def test_multimodal_gemma3_and_other_architectures_are_refused():
    from transformers import Gemma3Config

    with pytest.raises(E.ExportError, match="architecture 'gemma3' cannot be exported.*gemma3_text"):
        G.gguf_arch(Gemma3Config(), "base x")


# --------------------------------------------------------------------------------------------
# verification: transformers where it can see the file, llama.cpp otherwise
# --------------------------------------------------------------------------------------------


def test_transformers_read_back_verifies_what_it_can_read(cases, tmp_path):
    """Mistral with a ``first``-scheme SentencePiece vocabulary: the transformers reader is a faithful judge."""
    result = G.export_gguf(cases["mistral"]["adapter"], tmp_path / "m.gguf", "q8_0")
    assert result.check is not None and result.check.max_abs_diff <= result.check.tolerance
    assert result.check.top1_agreement > 0.8


@pytest.mark.parametrize(("name", "blind"), [("llama31", "rope_freqs"), ("llama2", "leading space"),
                                             ("gemma2", "soft-capping"), ("gemma3", "local rope base"),
                                             ("phi3", "partial rotary")])
def test_a_read_back_that_cannot_see_the_family_is_refused_not_trusted(cases, tmp_path, monkeypatch, name, blind):
    from qlora_orpo.export import gguf_llamacpp
    from qlora_orpo.models import loader

    monkeypatch.setattr(gguf_llamacpp, "llama_cpp_available", lambda: False)  # llama.cpp would judge these itself
    monkeypatch.setattr(loader, "load_base", lambda *a, **k: pytest.fail("weights loaded before the refusal"))
    with pytest.raises(E.ExportError, match=f"transformers' GGUF reader cannot verify.*{blind}") as info:
        G.export_gguf(cases[name]["adapter"], tmp_path / "x.gguf", "f32")
    assert len(str(info.value).splitlines()) == 1


def llama_cpp_bound(quant: str, scale: float) -> float:
    """Largest accepted |llama.cpp - float32 merged| logit difference in these tests.

    f32: llama.cpp's own kernels (blocked dot products, its softmax) are not bit-equal to torch's;
    measured up to 0.005 at max|logit| 3 (Gemma-2, soft-capped) and about 0.001 elsewhere, so
    ``0.01 * max(1, max|logit|)``. q8_0: the export's own tolerance (:func:`gguf_verify.gguf_tolerance`).
    """
    return 0.01 * max(1.0, scale) if quant == "f32" else GV.gguf_tolerance(quant, scale)


needs_llama_cpp = pytest.mark.skipif(llama_cpp is None, reason="llama_cpp (llama-cpp-python) is not installed")


@needs_llama_cpp
@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("name", FAMILIES)
def test_llama_cpp_loads_tokenises_and_agrees(cases, exports, name, quant):
    case = cases[name]
    got = llama_cpp_check(case, exports[(name, quant)].path, space_scheme(case))
    assert got["n_vocab"] == case["config"].vocab_size
    assert got["mismatches"] == [] and got["bos_once"]
    bound = llama_cpp_bound(quant, got["scale"])
    assert got["max_diff"] <= bound, got
    assert got["top1"] > 0.8  # random tiny models have near-ties; the logit bound above is the real check


@needs_llama_cpp
def test_llama_cpp_first_scheme_differs_only_at_offset_zero(cases, exports):
    """Mistral's ``first`` scheme: llama.cpp (add_space_prefix false) drops only the ``▁`` transformers puts at offset 0."""
    tokenizer = cases["mistral"]["tokenizer"]
    llm = llama_cpp.Llama(model_path=exports[("mistral", "f32")].path, n_ctx=64, vocab_only=True, verbose=False)
    for text in TEXTS[:2]:
        ours = tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False)["input_ids"])
        theirs = tokenizer.convert_ids_to_tokens(llm.tokenize(text.encode(), add_bos=False, special=True))
        assert "".join(ours) == S.SPACE + "".join(theirs)


@needs_llama_cpp
@pytest.mark.parametrize(("name", "target", "broken"), [
    ("llama31", "extra_tensors", lambda config, arch: {}),
    ("gemma2", "shift_norm", lambda arch, hf_name, data: data),
    ("gemma2", "write_family_metadata", lambda writer, config, arch: None),
    ("phi3long", "extra_tensors", lambda config, arch: {}),
])
def test_llama_cpp_sees_a_dropped_family_feature(cases, tmp_path, monkeypatch, name, target, broken):
    """Without rope_freqs, the ``1 + w`` norms, the soft-capping metadata or the longrope factors,
    llama.cpp's logits move far off."""
    monkeypatch.setattr(G, target, broken)
    result = G.export_gguf(cases[name]["adapter"], tmp_path / "b.gguf", "f32", verify=False)
    got = llama_cpp_check(cases[name], result.path, space_scheme(cases[name]))
    assert got["max_diff"] > 3 * llama_cpp_bound("f32", got["scale"]), got


@needs_llama_cpp
def test_llama_cpp_always_scheme_differs_only_on_runs_that_start_with_a_space(cases, tmp_path):
    """A ``Metaspace(always)`` tokenizer (transformers' LlamaTokenizer with ``legacy=True``, e.g. Mistral v0.1):
    written with ``add_space_prefix = true`` as the converter writes it, llama.cpp prepends a space to
    every run after a special token, transformers only to runs that do not start with one. Pinned
    here so that the difference stays known: ``[INST] What`` gets one ``▁`` more in llama.cpp."""
    import shutil

    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    base = tmp_path / "base"
    shutil.copytree(cases["mistral"]["root"] / "base", base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=S.SPACE, prepend_scheme="always",
                                                                         split=False)
    tokenizer.save_pretrained(base)
    vocab = S.build_any_vocab(tokenizer, cases["mistral"]["config"].vocab_size)
    assert (vocab.add_space_prefix, vocab.space_scheme) == (True, "always")
    result = G.export_gguf(cases["mistral"]["adapter"], tmp_path / "a.gguf", "f32", base=str(base), force=True,
                           verify=False)
    llm = llama_cpp.Llama(model_path=result.path, n_ctx=64, vocab_only=True, verbose=False)

    def both(text: str) -> tuple[list[str], list[str]]:
        ours = tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False)["input_ids"])
        return ours, tokenizer.convert_ids_to_tokens(llm.tokenize(text.encode(), add_bos=False, special=True))

    for text in ("<s>[INST]What is[/INST]Paris</s>", "hello world"):  # no run starts with a space: identical
        ours, theirs = both(text)
        assert ours == theirs, text
    ours, theirs = both("<s>[INST] What is")
    assert "".join(theirs) == "".join(ours).replace("[INST]", "[INST]" + S.SPACE)
