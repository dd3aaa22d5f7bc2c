"""Tiny random models of the families users bring, each with its own chat template and special tokens.

The templates are shortened from the families' published ones but keep what matters here:
BOS handling, the system turn (Gemma-2 and Mistral refuse it), the header tokens, ``trim``
of the content (Llama-3, Gemma) and the tokens that close an assistant turn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from conftest import CORPUS

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN2_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are Qwen, a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
    "{% endfor %}"
)
PHI3_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + '<|end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


@dataclass(frozen=True)
class Family:
    name: str
    template: str | None
    specials: tuple[str, ...]
    eos: str
    pad: str
    bos: str | None
    end_of_turn: tuple[str, ...]  # the tokens a trained reply must end with, as text
    refuses_system: bool = False
    config_kwargs: dict = field(default_factory=dict)

    def build_tokenizer(self):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        core = Tokenizer(models.BPE())
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        core.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=420, special_tokens=list(self.specials),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )
        core.train_from_iterator(CORPUS, trainer=trainer)
        if self.bos and self.template is None:  # a plain tokenizer adds its BOS itself
            from tokenizers import processors

            bos_id = core.token_to_id(self.bos)
            core.post_processor = processors.TemplateProcessing(single=f"{self.bos} $A", special_tokens=[(self.bos, bos_id)])
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=self.bos, eos_token=self.eos, pad_token=self.pad)
        tokenizer.add_special_tokens({"additional_special_tokens": [t for t in self.specials if t not in (self.bos, self.eos, self.pad)]})
        if self.template:
            tokenizer.chat_template = self.template
        return tokenizer

    def build_model(self, tokenizer, seed: int = 0):
        import transformers

        torch.manual_seed(seed)
        config_cls, model_cls = self.config_kwargs["classes"]
        kwargs = {k: v for k, v in self.config_kwargs.items() if k != "classes"}
        config = getattr(transformers, config_cls)(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id, **kwargs,
        )
        return getattr(transformers, model_cls)(config).float().eval()

    def save(self, directory: Path) -> Path:
        tokenizer = self.build_tokenizer()
        self.build_model(tokenizer).save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        return directory


FAMILIES = {
    "llama3": Family(
        "llama3", LLAMA3_TEMPLATE,
        ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        eos="<|end_of_text|>", pad="<|end_of_text|>", bos="<|begin_of_text|>", end_of_turn=("<|eot_id|>",),
        config_kwargs={"classes": ("LlamaConfig", "LlamaForCausalLM")},
    ),
    "qwen2": Family(
        "qwen2", QWEN2_TEMPLATE, ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        eos="<|endoftext|>", pad="<|endoftext|>", bos=None, end_of_turn=("<|im_end|>",),
        config_kwargs={"classes": ("Qwen2Config", "Qwen2ForCausalLM")},
    ),
    "gemma2": Family(
        "gemma2", GEMMA2_TEMPLATE, ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"),
        eos="<eos>", pad="<pad>", bos="<bos>", end_of_turn=("<end_of_turn>",), refuses_system=True,
        # A wide initialisation pushes raw logits far past the cap, so a loss that skips the
        # soft-capping is visibly wrong.
        config_kwargs={"classes": ("Gemma2Config", "Gemma2ForCausalLM"), "final_logit_softcapping": 30.0,
                       "head_dim": 16, "initializer_range": 2.0, "sliding_window": 16},
    ),
    "mistral": Family(
        "mistral", MISTRAL_TEMPLATE, ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"),
        eos="</s>", pad="</s>", bos="<s>", end_of_turn=("</s>",), refuses_system=True,
        config_kwargs={"classes": ("MistralConfig", "MistralForCausalLM"), "sliding_window": 64},
    ),
    "phi3": Family(
        "phi3", PHI3_TEMPLATE, ("<|endoftext|>", "<s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
        eos="<|endoftext|>", pad="<|endoftext|>", bos="<s>", end_of_turn=("<|end|>", "\n", "<|endoftext|>"),
        config_kwargs={"classes": ("Phi3Config", "Phi3ForCausalLM")},
    ),
    "plain": Family(
        "plain", None, ("<|endoftext|>", "<s>", "</s>"),
        eos="</s>", pad="<|endoftext|>", bos="<s>", end_of_turn=("</s>",),
        config_kwargs={"classes": ("LlamaConfig", "LlamaForCausalLM")},
    ),
}
