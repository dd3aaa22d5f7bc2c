"""Sharing and export: self-describing adapters and their cards, the merged model, GGUF files.

``adapters`` and ``card`` save and load adapters with the base's fingerprint; ``merged``
merges an adapter into its base and ``verify`` checks the result with plain transformers
in a fresh process; ``gguf``, ``gguf_vocab`` and ``gguf_verify`` write and check GGUF files
(and an Ollama Modelfile); ``gguf_lora`` and ``gguf_lora_check`` write and check the adapter
alone as llama.cpp's LoRA GGUF. Imports the layers below it.
"""
