"""qlora_orpo: ORPO on a 4-bit base with LoRA."""
