"""Verification of a llama.cpp LoRA adapter file against the adapter in peft.

Two judges, both against peft's own view of the adapter (base float32 + unmerged adapter):

* **Structural**, always (it needs only the ``gguf`` package): the file says
  ``general.type = adapter``, ``adapter.type = lora`` and the base's architecture; every layer
  peft adapts has its ``.lora_a``/``.lora_b`` pair and nothing else is in the file; the shapes
  are what llama.cpp's loader requires against the base GGUF's tensor of the same name
  (``ne = [in, r]`` and ``[r, out]``); and ``alpha / r * B A``, computed from the file as
  llama.cpp computes its scale, equals peft's ``get_delta_weight`` with the base GGUF's
  q/k row permutation applied. A wrong permutation, scale, name or transposition fails here.
* **llama.cpp**, when llama-cpp-python is installed: a ``python -I`` subprocess (a crash in
  llama.cpp cannot take the export down; it never imports ``qlora_orpo``, and checks that)
  loads the base GGUF with the adapter (``lora_path``), evaluates the verification token ids
  and greedy continuations of their first halves (float32 KV cache, as
  :mod:`~qlora_orpo.export.gguf_llamacpp` runs the merged files), and its logits must be within
  that module's tolerance for the base GGUF's quant of peft's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .gguf import PERMUTE_QK, permute_qk
from .gguf_llamacpp import llamacpp_tolerance
from .gguf_verify import QUANTS, _common_prefix, _greedy
from .verify import ExportVerificationError, reference_logits

if TYPE_CHECKING:
    from peft import PeftModel

STRUCTURE_RTOL = 1e-5  # float32 products of rank-r factors: a few eps32 * sqrt(r); any real mistake is O(1)


@dataclass
class LlamaCppCheck:
    max_abs_diff: float  # llama.cpp (base GGUF + adapter file) vs peft (float32 base + adapter), over all logits
    tolerance: float
    base_quant: str
    logit_scale: float  # max |reference logit|
    top1_agreement: float
    greedy_identical: int
    greedy_runs: int
    greedy_prefix: float  # mean share of each continuation before the first difference
    adapter_effect: float  # max |peft with adapter - without| logit difference: what the check can see
    tokens_compared: int


def tensor_name_map(arch: str, n_layers: int) -> Any:
    """gguf's transformers -> GGUF tensor name map for ``arch`` (the one gguf.gguf_tensors uses)."""
    import gguf

    arch_enum = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    return gguf.get_tensor_name_map(arch_enum, n_layers)


def lora_layers(peft_model: PeftModel) -> dict[str, Any]:
    """``{transformers module name: peft LoRA layer}`` of the default adapter."""
    return {name.removeprefix("base_model.model."): module for name, module in peft_model.named_modules()
            if "default" in getattr(module, "lora_A", {})}


def check_structure(path: Path, peft_model: PeftModel, config: Any, arch: str, base_file: Path | None = None) -> float:
    """Check the adapter file at ``path`` against ``peft_model`` (and the base GGUF's tensors); the max relative difference.

    Raises :class:`ExportVerificationError` naming the first mismatch.
    """
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = reader.fields
    for key, want in (("general.type", "adapter"), ("adapter.type", "lora"), ("general.architecture", arch)):
        got = fields[key].contents() if key in fields else None
        if got != want:
            raise ExportVerificationError(f"{path}: {key} is {got!r}, llama.cpp needs {want!r}")
    alpha = float(fields["adapter.lora.alpha"].contents()) if "adapter.lora.alpha" in fields else 0.0
    tensors = {t.name: t for t in reader.tensors}
    base = {t.name: [int(n) for n in t.shape] for t in gguf.GGUFReader(str(base_file)).tensors} if base_file else None
    names = tensor_name_map(arch, config.num_hidden_layers)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    layers = lora_layers(peft_model)
    expected: set[str] = set()
    worst = 0.0
    for module, layer in layers.items():
        target = names.get_name(f"{module}.weight", try_suffixes=(".weight",))
        a_name, b_name = f"{target}.lora_a", f"{target}.lora_b"
        expected |= {a_name, b_name}
        if a_name not in tensors or b_name not in tensors:
            raise ExportVerificationError(f"{path}: {module} is adapted in peft but {a_name}/{b_name} is missing")
        delta = layer.get_delta_weight("default").detach().float()  # (out, in), peft's scale included
        out_features, in_features = delta.shape
        a_t, b_t = tensors[a_name], tensors[b_name]
        rank = int(b_t.shape[0])  # what llama.cpp reads the rank from (lora_b.ne[0])
        if [int(n) for n in a_t.shape] != [in_features, rank] or [int(n) for n in b_t.shape] != [rank, out_features]:
            raise ExportVerificationError(f"{path}: {a_name} ne={list(a_t.shape)} / {b_name} ne={list(b_t.shape)}; "
                                          f"llama.cpp needs [{in_features}, r] and [r, {out_features}]")
        if base is not None and base.get(target) != [in_features, out_features]:
            raise ExportVerificationError(f"{path}: the base GGUF has {target} as {base.get(target)}, "
                                          f"the adapter needs [{in_features}, {out_features}]")
        if arch in PERMUTE_QK and ".attn_q." in target:
            delta = permute_qk(delta, heads)
        elif arch in PERMUTE_QK and ".attn_k." in target:
            delta = permute_qk(delta, kv_heads)
        a = np.asarray(a_t.data, dtype=np.float64).reshape(rank, in_features)
        b = np.asarray(b_t.data, dtype=np.float64).reshape(out_features, rank)
        scale = alpha / rank if alpha else 1.0  # llama_adapter_lora_weight::get_scale
        got = torch.from_numpy(scale * (b @ a))
        ref = delta.double()
        diff = float((got - ref).abs().max() / max(float(ref.abs().max()), 1e-30))
        if not diff <= STRUCTURE_RTOL:  # also catches NaN
            raise ExportVerificationError(f"{path}: {target}: alpha/r * B A differs from peft's delta weight by "
                                          f"{diff:.3g} of its largest entry (wrong scale, order or permutation)")
        worst = max(worst, diff)
    extra = sorted(set(tensors) - expected)
    if extra:
        raise ExportVerificationError(f"{path}: holds {extra[0]}, which peft does not adapt")
    return worst


LLAMA_CPP_SCRIPT = r"""
import json, sys
from pathlib import Path
import numpy as np
from llama_cpp import Llama
from safetensors.numpy import save_file

base, adapter, io_dir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
spec = json.loads((io_dir / "inputs.json").read_text())
n_ctx = max(len(s) for s in spec["ids"] + spec["greedy_prompts"]) + spec["greedy_tokens"] + 8
# A float32 KV cache (type 0), as gguf_llamacpp's judge runs: an f32 base is judged on its own numbers.
llm = Llama(model_path=base, lora_path=adapter, logits_all=True, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
            n_threads=spec["threads"], n_threads_batch=spec["threads"], type_k=0, type_v=0, flash_attn=False,
            seed=0, verbose=False)
out, greedy = {}, []
for i, ids in enumerate(spec["ids"]):
    llm.reset()
    llm.eval(ids)
    out[f"logits_{i}"] = np.array(llm.scores[: len(ids)], dtype=np.float32)  # a copy: the next eval overwrites scores
for prompt in spec["greedy_prompts"]:
    llm.reset()
    llm.eval(prompt)
    tokens = []
    for _ in range(spec["greedy_tokens"]):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        tokens.append(token)
        llm.eval([token])
    greedy.append(tokens)
save_file(out, str(io_dir / "logits.safetensors"))
imported = any(m == "qlora_orpo" or m.startswith("qlora_orpo.") for m in sys.modules)
(io_dir / "report.json").write_text(json.dumps({"greedy": greedy, "qlora_orpo_imported": imported}))
"""


def base_quant_of(base_file: Path) -> str:
    """The quant of the base GGUF's matrices, from its ``general.file_type``."""
    import gguf

    fields = gguf.GGUFReader(str(base_file)).fields
    file_type = int(fields["general.file_type"].contents()) if "general.file_type" in fields else -1
    try:  # gguf's names: ALL_F32, MOSTLY_F16, MOSTLY_Q8_0, MOSTLY_Q4_K_M... -> --quant's spelling
        quant = gguf.LlamaFileType(file_type).name.removeprefix("ALL_").removeprefix("MOSTLY_").lower()
    except ValueError:
        quant = f"file type {file_type}"
    if quant not in QUANTS:
        raise ExportVerificationError(f"{base_file}: a {quant} base has no llama.cpp tolerance here "
                                      f"(known: {', '.join(QUANTS)})")
    return quant


def run_llama_cpp(adapter: Path, base_file: Path, peft_model: PeftModel, ids: list[list[int]],
                  greedy_tokens: int, arch: str) -> LlamaCppCheck:
    """llama.cpp's logits and greedy tokens for base GGUF + ``adapter`` against ``peft_model``'s; raises on a mismatch.

    The tolerance is the merged file's under llama.cpp (:func:`~qlora_orpo.export.gguf_llamacpp.llamacpp_tolerance`
    for the base GGUF's quant): the adapter's F32 product adds no rounding of its own beyond float32's.
    """
    from safetensors.numpy import load_file

    quant = base_quant_of(base_file)
    prompts = [seq[: max(1, len(seq) // 2)] for seq in ids]
    reference = reference_logits(peft_model, ids)
    with peft_model.disable_adapter():
        plain = reference_logits(peft_model, ids)
    reference_greedy = _greedy(peft_model, prompts, greedy_tokens)
    spec = {"ids": ids, "greedy_prompts": prompts, "greedy_tokens": greedy_tokens,
            "threads": max(1, int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1))}
    with tempfile.TemporaryDirectory(prefix="qlora_orpo-gguf-lora-") as io:
        io_dir = Path(io)
        (io_dir / "inputs.json").write_text(json.dumps(spec))
        proc = subprocess.run([sys.executable, "-I", "-c", LLAMA_CPP_SCRIPT, str(base_file), str(adapter), str(io_dir)],
                              capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise ExportVerificationError(f"{adapter}: llama.cpp cannot run {base_file.name} with the adapter "
                                          f"(exit {proc.returncode}): {' | '.join(tail)}")
        report = json.loads((io_dir / "report.json").read_text())
        arrays = load_file(str(io_dir / "logits.safetensors"))
    if report.get("qlora_orpo_imported"):
        raise ExportVerificationError(f"{adapter}: the llama.cpp runner imported qlora_orpo")
    logits = [torch.from_numpy(arrays[f"logits_{i}"]) for i in range(len(ids))]
    scale = max(float(r.abs().max()) for r in reference)
    tol = llamacpp_tolerance(quant, scale, arch)
    max_diff = max(float((a - b).abs().max()) for a, b in zip(logits, reference, strict=True))
    if not max_diff <= tol:
        raise ExportVerificationError(f"{adapter}: llama.cpp's logits (base {quant} + adapter) differ from peft's by "
                                      f"up to {max_diff:.3g}, above the tolerance {tol:.3g}; nothing was written")
    agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(logits, reference, strict=True))
    # generate() stops at EOS, the runner does not: compare llama.cpp's tokens up to where peft's ended.
    pairs = [(cpp[: len(ref)], ref) for cpp, ref in zip(report["greedy"], reference_greedy, strict=True)]
    return LlamaCppCheck(
        max_abs_diff=max_diff, tolerance=tol, base_quant=quant, logit_scale=scale,
        top1_agreement=agree / sum(len(r) for r in reference),
        greedy_identical=sum(a == b for a, b in pairs), greedy_runs=len(pairs),
        greedy_prefix=sum(_common_prefix(a, b) / max(1, len(b)) for a, b in pairs) / max(1, len(pairs)),
        adapter_effect=max(float((r - p).abs().max()) for r, p in zip(reference, plain, strict=True)),
        tokens_compared=sum(len(r) for r in reference),
    )
