"""Every family users bring, on a tiny random model with its own chat template: what is trained on,
how a reply ends, log-probs through the model's own head, and a train -> export -> reload round trip."""

from __future__ import annotations

import json

import pytest
import torch
from families import FAMILIES

from qlora_orpo.data.preferences import PreferencePair
from qlora_orpo.data.templating import (
    ChatFormat,
    render_prompt,
    show_example,
    stop_token_ids,
    tokenize_pair,
    tokenize_pairs,
)
from qlora_orpo.training.head import OutputHead, chunked_token_logps

NAMES = sorted(FAMILIES)


def pair(prompt="What is the capital of France?", chosen="The capital of France is Paris.",
         rejected="I can't help with that.", system=None, row=1):
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return PreferencePair(tuple(messages), chosen, rejected, row, "pairs.jsonl")


@pytest.fixture(scope="module", params=NAMES)
def family(request):
    fam = FAMILIES[request.param]
    return fam, fam.build_tokenizer()


def test_labelled_reply_ends_with_the_templates_end_of_turn(family):
    fam, tokenizer = family
    tokenized, _ = tokenize_pair(pair(), tokenizer, max_length=256, max_prompt_length=128)
    end = [tokenizer.convert_tokens_to_ids(t) if t != "\n" else None for t in fam.end_of_turn]
    tail = tokenized.chosen_ids[-len(end):]
    decoded_tail = [tokenizer.decode([t]) for t in tail]
    assert decoded_tail == list(fam.end_of_turn), f"{fam.name}: reply ends with {decoded_tail}"
    assert tokenized.rejected_ids[-len(end):] == tail
    if fam.template:
        # Prompt + labelled reply is exactly what the template writes for the conversation,
        # up to the end-of-turn.
        full = tokenizer.apply_chat_template(
            [*pair().prompt, {"role": "assistant", "content": pair().chosen}], tokenize=False
        )
        text = tokenizer.decode(list(tokenized.prompt_ids + tokenized.chosen_ids), skip_special_tokens=False)
        assert full.startswith(text) and text.endswith(fam.end_of_turn[-1])


def test_stop_tokens_for_generation_include_the_end_of_turn_and_eos(family):
    fam, tokenizer = family
    stops = stop_token_ids(tokenizer)
    assert tokenizer.convert_tokens_to_ids(fam.end_of_turn[0]) in stops
    assert tokenizer.eos_token_id in stops


def test_system_turn_kept_or_folded_into_the_first_user_turn(family):
    fam, tokenizer = family
    tokenized, stats = tokenize_pairs([pair(system="Answer in French.")], tokenizer, 256, 128, progress=False)
    prompt = tokenizer.decode(list(tokenized[0].prompt_ids), skip_special_tokens=False)
    assert "Answer in French." in prompt and "What is the capital" in prompt
    assert ChatFormat.of(tokenizer).folds_system == fam.refuses_system
    assert stats.system_folded == int(fam.refuses_system)
    if fam.refuses_system:
        assert "Answer in French.\n\nWhat is the capital of France?" in prompt
    if fam.template is None:
        assert prompt.endswith("System: Answer in French.\n\nUser: What is the capital of France?\n\nAssistant:")


def test_truncated_prompt_keeps_bos_and_system_header(family):
    fam, tokenizer = family
    long = " ".join(["the quick brown fox jumps over the lazy dog"] * 12)
    system = None if fam.refuses_system or fam.template is None else "Be brief."
    example = pair(prompt=long, system=system)
    full, _ = tokenize_pair(example, tokenizer, 10_000, 9_999)
    cut, info = tokenize_pair(example, tokenizer, 64, 32)
    assert info["truncated_prompt"] == 1 and len(cut.prompt_ids) == 32
    writes_bos = fam.bos and (fam.template is None or "bos_token" in fam.template)
    if writes_bos:
        assert cut.prompt_ids[0] == tokenizer.bos_token_id == full.prompt_ids[0]
    text = tokenizer.decode(list(cut.prompt_ids), skip_special_tokens=False)
    if system:
        assert "Be brief." in text
    # The head the template writes before the user's text survives: BOS, system turn, user header.
    first_user_text = example.prompt[-1]["content"][:9]
    full_text = tokenizer.decode(list(full.prompt_ids), skip_special_tokens=False)
    assert text.startswith(full_text[: full_text.index(first_user_text)])
    assert full.prompt_ids[-8:] == cut.prompt_ids[-8:], "the generation prompt at the end is kept"


def test_template_error_names_file_row_and_field():
    from qlora_orpo.core.errors import DataError

    fam = FAMILIES["gemma2"]
    tokenizer = fam.build_tokenizer()
    alternating = PreferencePair(
        ({"role": "user", "content": "a"}, {"role": "user", "content": "b"}), "c", "d", 17, "pairs.jsonl"
    )
    with pytest.raises(DataError) as info:
        tokenize_pair(alternating, tokenizer, 64, 32)
    assert str(info.value).startswith("pairs.jsonl, row 17, field 'prompt': the chat template refused")
    assert "alternate" in str(info.value)


def test_show_example_marks_the_trained_span(family):
    fam, tokenizer = family
    tokenized, _ = tokenize_pair(pair(), tokenizer, 256, 128)
    text = show_example(tokenizer, tokenized)
    assert "[[" in text and text.count("]]") == 2
    chosen_line = text.split("[chosen]\n", 1)[1].split("\n[rejected]")[0]
    assert chosen_line.rstrip().endswith(fam.end_of_turn[-1] + "]]") or fam.end_of_turn[-1] == "\n"
    assert "The capital of France is Paris." in chosen_line.split("[[", 1)[1]
    assert chosen_line.split("[[", 1)[0] == render_prompt(tokenizer, pair().prompt) or fam.template is None


def _full_forward_token_logps(model, input_ids):
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits.float()
    return torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)


EXTRA_HEADS = {
    # Families whose forward transforms the lm_head output, beyond Gemma-2's soft-cap.
    "cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.0625, "initializer_range": 1.0}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 8.0, "initializer_range": 1.0}),
}


def _tiny(config_cls: str, model_cls: str, vocab: int, **kwargs):
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2, **kwargs,
    )
    return getattr(transformers, model_cls)(config).float().eval()


@pytest.mark.parametrize("name", NAMES + sorted(EXTRA_HEADS))
def test_chunked_logps_equal_the_models_own_forward(name):
    if name in FAMILIES:
        fam = FAMILIES[name]
        model = fam.build_model(fam.build_tokenizer())
    else:
        config_cls, model_cls, kwargs = EXTRA_HEADS[name]
        model = _tiny(config_cls, model_cls, 300, **kwargs)
    vocab = model.config.vocab_size
    input_ids = torch.randint(1, vocab, (2, 40), generator=torch.Generator().manual_seed(1))
    labels = input_ids.clone()
    reference = _full_forward_token_logps(model, input_ids)
    head = OutputHead(model)
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=input_ids).last_hidden_state
        chunked = chunked_token_logps(hidden, head, labels, chunk_size=7)
        bare = chunked_token_logps(hidden, model.get_output_embeddings(), labels, chunk_size=7)
    difference = (chunked - reference).abs().max().item()
    print(f"{name}: max |chunked - full forward| = {difference:.3g}")
    assert difference < 1e-5
    if name in ("gemma2", "cohere", "granite"):
        # The transform matters: the bare lm_head would be far off.
        assert (bare - reference).abs().max().item() > 0.5


def test_gemma2_nll_respects_the_softcap_bound():
    fam = FAMILIES["gemma2"]
    model = fam.build_model(fam.build_tokenizer())
    input_ids = torch.randint(1, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=input_ids).last_hidden_state
        logps = chunked_token_logps(hidden, OutputHead(model), input_ids, chunk_size=16)
    bound = torch.log(torch.tensor(float(model.config.vocab_size))) + 2 * model.config.final_logit_softcapping
    assert (-logps).max() <= bound


def write_pairs(path, n=12, system=False):
    words = "the quick brown fox jumps over lazy dog hello world capital France Paris bread".split()
    g = torch.Generator().manual_seed(0)
    with open(path, "w") as handle:
        for _ in range(n):
            w = [words[int(j)] for j in torch.randint(0, len(words), (8,), generator=g)]
            prompt = [{"role": "user", "content": " ".join(w[:3])}]
            if system:
                prompt.insert(0, {"role": "system", "content": "Be kind."})
            handle.write(json.dumps({
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": "hello world " + " ".join(w[3:6])}],
                "rejected": [{"role": "assistant", "content": "the lazy dog " + " ".join(w[5:8])}],
            }) + "\n")
    return path


@pytest.mark.parametrize("name", NAMES)
def test_dry_run_shows_the_trained_span_then_train_export_and_reload(name, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from qlora_orpo.cli.train import main
    from qlora_orpo.config import OrpoConfig
    from qlora_orpo.export.merged import export_merged
    from qlora_orpo.recipes.chat import chat, load_for_chat
    from qlora_orpo.recipes.finetune import run

    fam = FAMILIES[name]
    model_dir = fam.save(tmp_path / name)
    data = write_pairs(tmp_path / "pairs.jsonl", system=True)
    assert main(["--dry-run", "--show-examples", "1", "--model", str(model_dir), "--data", str(data)]) == 0
    shown = capsys.readouterr().out
    end_text = "".join(fam.end_of_turn)
    print(f"{name}: --show-examples reply ends with {end_text!r}")
    assert f"{end_text}]]" in shown
    cfg = OrpoConfig(
        model=str(model_dir), data=str(data), output_dir=str(tmp_path / "runs"), run_name=name,
        quant="nf4", compute_dtype="float32", device="cpu", max_steps=2, batch_size=2, grad_accum=1,
        max_length=64, max_prompt_length=32, lora_r=4, lora_alpha=8, eval_fraction=0.0, save_every=0,
        logits_chunk_size=8,
    )
    summary = run(cfg)
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines())
              if r.get("split") == "train"]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    # Export merges into the float32 base and verifies the directory with plain transformers
    # in a separate process; then it is reloaded here too.
    result = export_merged(summary["adapter"], tmp_path / "merged")
    assert result.max_abs_diff <= result.tolerance
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert type(merged).__name__ == type(fam.build_model(fam.build_tokenizer())).__name__
    # Chat with the adapter: generation stops at the end-of-turn token at the latest.
    model, tokenizer = load_for_chat(adapter=summary["adapter"], device="cpu")
    from qlora_orpo.recipes.chat import GenerationSettings

    replies = chat(model, tokenizer, ["hello world"], GenerationSettings(max_new_tokens=8), out=open("/dev/null", "w"))
    assert isinstance(replies[0]["reply"], str)


@pytest.mark.parametrize("name", NAMES)
def test_memory_floor_counts_the_lora_parameters_peft_creates(name):
    """Phi-3's fused qkv_proj/gate_up_proj must not be counted as separate q/k/v/gate/up layers."""
    from peft import LoraConfig, get_peft_model

    from qlora_orpo.models.floor import ModelShape

    fam = FAMILIES[name]
    model = fam.build_model(fam.build_tokenizer())
    shape = ModelShape.from_config(model.config)
    assert shape.quantised_params == sum(
        m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n
    )
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert shape.lora_params(4) == trainable
