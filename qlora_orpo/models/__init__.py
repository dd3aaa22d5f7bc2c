"""The base model and the machine it runs on: the one loader, the embedded model, memory, planning.

``loader`` loads a 4-bit (or unquantised) base with LoRA; ``embedded`` converts the
shipped SmolLM2 GGUF once into a cache; ``bnb_cpu`` holds the bitsandbytes CPU work-arounds;
``dtype_probe`` picks the faster CPU compute dtype; ``memory`` measures peaks and sets the
CPU allocator; ``fingerprint`` identifies a base; ``floor`` and ``plan`` are the planner's
memory arithmetic. Imports ``core`` and ``config`` only.
"""
