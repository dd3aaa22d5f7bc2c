"""Tiny random models of the GGUF families (issue 21) with their tokenizers, and llama.cpp as a judge.

Used by ``test_gguf_families.py``. Each family is built from a config in milliseconds; its
tokenizer is trained on :data:`conftest.CORPUS` in the shape Hugging Face ships for that family
(SentencePiece-style BPE with byte fallback, or byte-level BPE with Llama-3's split regex).
"""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import CORPUS
from families import GEMMA2_TEMPLATE, LLAMA3_TEMPLATE, MISTRAL_TEMPLATE, PHI3_TEMPLATE
from test_sentencepiece import LLAMA2_TEMPLATE

from qlora_orpo.config import OrpoConfig
from qlora_orpo.export import adapters as A
from qlora_orpo.export import gguf_families as F
from qlora_orpo.export import gguf_spm as S
from qlora_orpo.export import gguf_verify as GV
from qlora_orpo.export import gguf_vocab as V

try:
    import llama_cpp
except ImportError:  # the optional llama.cpp judge; its checks are skipped only when it is absent
    llama_cpp = None

SPM_SPECIALS = ("<unk>", "<s>", "</s>")
TEXTS = ["the quick brown fox jumps over the lazy dog", "What is the capital of France? Paris.",
         "  two spaces, a tab\tand café 0123456789 中文"]


# --------------------------------------------------------------------------------------------
# tokenizers
# --------------------------------------------------------------------------------------------


def spm_tokenizer(style: str, specials: tuple[str, ...], bos: str, eos: str, pad: str, template: str | None):
    """A SentencePiece-style BPE as Hugging Face ships one converted from ``tokenizer.model``.

    Trained on :data:`CORPUS`, then rebuilt the way transformers converts a SentencePiece model:
    ``<unk> <s> </s>``, the 256 ``<0xNN>`` byte-fallback tokens, the pieces, and merges for every
    split of every piece ordered by the piece's id (``generate_merges``), so that any pair whose
    concatenation is a piece merges, as SentencePiece (and llama.cpp) do. ``style``:
    ``legacy`` (Llama-2, Phi-3: ``▁`` prepended and spaces replaced by the normaliser),
    ``metaspace`` (Mistral, ``legacy=False``) or ``gemma`` (spaces replaced, no prefix).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.tokenization_utils_base import generate_merges

    sp = S.SPACE
    corpus = [(sp if style == "legacy" else "") + line.replace(" ", sp) for line in CORPUS]
    core = Tokenizer(models.BPE())
    core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                         initial_alphabet=sorted(set("".join(corpus)))))
    pieces = sorted(core.get_vocab().items(), key=lambda kv: kv[1])
    head = [*SPM_SPECIALS, *(f"<0x{b:02X}>" for b in range(256))]
    vocab = {token: i for i, token in enumerate(head + [p for p, _ in pieces if p not in head])}
    merges = generate_merges(vocab, {t: -float(i) for t, i in vocab.items() if i >= len(head)})
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    replace = normalizers.Replace(" ", sp)
    if style == "legacy":
        core.normalizer = normalizers.Sequence([normalizers.Prepend(sp), replace])
    elif style == "gemma":  # as transformers' GemmaTokenizer builds it
        core.normalizer = replace
        core.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    else:
        core.pre_tokenizer = pre_tokenizers.Metaspace(replacement=sp, prepend_scheme="first", split=False)
    strip = [decoders.Strip(content=" ", left=1, right=0)] if style == "legacy" else []
    core.decoder = (decoders.Metaspace(replacement=sp, prepend_scheme="first", split=False) if style == "metaspace"
                    else decoders.Sequence([decoders.Replace(sp, " "), decoders.ByteFallback(), decoders.Fuse(), *strip]))
    extra = [t for t in specials if t not in vocab]
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (*SPM_SPECIALS, *extra)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos, eos_token=eos, pad_token=pad,
                                        unk_token="<unk>")
    if template is None:  # a plain SentencePiece tokenizer adds BOS itself, as LlamaTokenizerFast does
        from tokenizers import processors

        core.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos, eos_token=eos, pad_token=pad,
                                            unk_token="<unk>")
    tokenizer.chat_template = template
    return tokenizer


def llama3_tokenizer():
    """Byte-level BPE with Llama-3's split regex (llama.cpp's ``llama-bpe``) and its header tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(V.LLAMA3_REGEX), behavior="isolated"),
                                                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=380, special_tokens=specials, show_progress=False,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|begin_of_text|>",
                                        eos_token="<|end_of_text|>", pad_token="<|end_of_text|>")
    tokenizer.chat_template = LLAMA3_TEMPLATE
    return tokenizer


# --------------------------------------------------------------------------------------------
# models: config class, model class, tokenizer, config kwargs
# --------------------------------------------------------------------------------------------

SIZES = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 512}
LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                # a short original context so that the 16-wide heads have factors 1, 8 and in between
                "original_max_position_embeddings": 64, "rope_theta": 500000.0}
PHI3_LONGROPE = {"rope_type": "longrope", "short_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 10.0],
                 "long_factor": [1.0, 2.0, 4.0, 8.0, 16.0, 32.0], "original_max_position_embeddings": 256}


def family_case(name: str):
    """``(config class, model class, tokenizer, config kwargs)`` of one tiny family."""
    gemma = {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8, "tie_word_embeddings": True}
    if name == "llama31":
        return "LlamaConfig", "LlamaForCausalLM", llama3_tokenizer(), {"rope_scaling": LLAMA31_ROPE,
                                                                       "tie_word_embeddings": True}
    if name == "llama2":
        tok = spm_tokenizer("legacy", SPM_SPECIALS + ("[INST]", "[/INST]"), "<s>", "</s>", "</s>", LLAMA2_TEMPLATE)
        return "LlamaConfig", "LlamaForCausalLM", tok, {"tie_word_embeddings": False}
    if name == "mistral":
        tok = spm_tokenizer("metaspace", SPM_SPECIALS + ("[INST]", "[/INST]"), "<s>", "</s>", "</s>", MISTRAL_TEMPLATE)
        return "MistralConfig", "MistralForCausalLM", tok, {"sliding_window": None, "tie_word_embeddings": False}
    if name == "gemma2":
        tok = spm_tokenizer("gemma", ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"),
                            "<bos>", "<eos>", "<pad>", GEMMA2_TEMPLATE)
        return "Gemma2Config", "Gemma2ForCausalLM", tok, {**gemma, "attn_logit_softcapping": 5.0,
                                                          "final_logit_softcapping": 3.0, "initializer_range": 0.5}
    if name == "gemma3":
        tok = spm_tokenizer("gemma", ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"),
                            "<bos>", "<eos>", "<pad>", GEMMA2_TEMPLATE)
        return "Gemma3TextConfig", "Gemma3ForCausalLM", tok, {
            **gemma, "layer_types": ["sliding_attention", "full_attention"],
            "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
                                "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}}}
    if name in ("phi3", "phi3long"):
        tok = spm_tokenizer("legacy" if name == "phi3" else "metaspace",
                            SPM_SPECIALS + ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
                            "<s>", "<|end|>", "</s>", PHI3_TEMPLATE)
        kwargs = {"partial_rotary_factor": 0.75, "sliding_window": None, "original_max_position_embeddings": 512,
                  "tie_word_embeddings": False}
        if name == "phi3long":  # Phi-3.5 / 128k style: 6 = 12 rotary dims / 2 factors of each kind
            kwargs.update(original_max_position_embeddings=256, rope_scaling=PHI3_LONGROPE)
        return "Phi3Config", "Phi3ForCausalLM", tok, kwargs
    raise KeyError(name)


FAMILIES = ("llama31", "llama2", "mistral", "gemma2", "gemma3", "phi3", "phi3long")
ARCH = {"llama31": "llama", "llama2": "llama", "mistral": "llama", "gemma2": "gemma2", "gemma3": "gemma3",
        "phi3": "phi3", "phi3long": "phi3"}
IDS = [[5, 17, 42, 99, 7, 3, 250, 11, 64, 1], [2, 300, 8, 8, 120, 33, 4, 19, 280, 6, 6, 6, 90, 15]]


def build_family(name: str):
    import transformers

    config_cls, model_cls, tokenizer, kwargs = family_case(name)
    config = getattr(transformers, config_cls)(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                               bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id, **SIZES, **kwargs)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).float().eval()
    with torch.no_grad():  # norms start at 0 (Gemma) or 1: random ones make a dropped ``1 + w`` visible
        low = -0.5 if ARCH[name] in F.NORM_PLUS_ONE else 0.5
        for param_name, param in model.named_parameters():
            if param_name.endswith("norm.weight"):
                param.uniform_(low, low + 1.0)
    return model, tokenizer


def make_case(root: Path, name: str) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = build_family(name)
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    base = AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(root / "base")
    torch.manual_seed(1)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                 init_lora_weights=False)).eval()
    with torch.no_grad():
        reference = [peft_model(torch.tensor([ids])).logits[0] for ids in IDS]
    adapter = A.save_adapter(peft_model, tokenizer, OrpoConfig(model=str(root / "base"), eval_fraction=0.0),
                             root / "adapter")
    return {"root": root, "adapter": adapter, "tokenizer": tokenizer, "reference": reference,
            "config": base.config}


# --------------------------------------------------------------------------------------------
# llama.cpp as the judge
# --------------------------------------------------------------------------------------------

CONVERSATION = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "Paris is the capital."},
                {"role": "user", "content": "and  bread?\tflour, water 42"}]


def check_texts(tokenizer, scheme: str | None) -> list[str]:
    """The mixed text the export verifies with, plain texts, and the chat-templated conversation.

    For a ``first``-scheme SentencePiece tokenizer (see :func:`gguf_spm.space_handling`) each text
    follows a BOS, where llama.cpp and transformers agree; at offset 0 they cannot (checked apart).
    """
    chat = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    texts = [GV.mixed_text(tokenizer, V.end_of_turn_token(tokenizer)), *TEXTS]
    if scheme == "first":
        texts = [tokenizer.bos_token + t for t in texts]
    return [*texts, chat]


def llama_cpp_check(case: dict, path: str, scheme: str | None) -> dict:
    """Load ``path`` in llama.cpp; token ids of :func:`check_texts` and logits on :data:`IDS` against the reference."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, n_threads=1, verbose=False)
    tokenizer = case["tokenizer"]
    mismatches = []
    texts = check_texts(tokenizer, scheme)
    for text in texts:
        ours = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        theirs = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        if theirs != ours:
            at = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs)))
            mismatches.append((text[:30], at, tokenizer.convert_ids_to_tokens(ours[at:at + 4]),
                               tokenizer.convert_ids_to_tokens(theirs[at:at + 4])))
    # BOS once: llama.cpp adding specials to the templated chat (which holds its BOS) gives transformers' ids
    bos_once = llm.tokenize(texts[-1].encode("utf-8"), add_bos=True, special=True) == list(tokenizer(texts[-1])["input_ids"])
    diffs, agree, total = [], 0, 0
    for ids, ref in zip(IDS, case["reference"], strict=True):
        llm.reset()
        llm.eval(ids)
        got = torch.from_numpy(llm.scores[: len(ids)].copy())
        diffs.append(float((got - ref).abs().max()))
        agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
        total += len(ids)
    scale = max(float(r.abs().max()) for r in case["reference"])
    return {"mismatches": mismatches, "max_diff": max(diffs), "scale": scale, "top1": agree / total,
            "bos_once": bos_once, "n_vocab": llm.n_vocab(), "llm": llm}
