"""LoRA adapter -> llama.cpp's adapter GGUF (``--lora``, Ollama ``ADAPTER``) and a Modelfile, verified.

The file is what llama.cpp's ``convert_lora_to_gguf.py`` writes, without a llama.cpp checkout:
``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha`` and, per adapted
linear layer, ``<gguf name>.lora_a`` (peft's A, ``(r, in)``; ggml ``ne = [in, r]``) and
``<gguf name>.lora_b`` (peft's B, ``(out, r)``; ``ne = [r, out]``), in F32 (exact, and a few MB).
llama.cpp's loader (``src/llama-adapter.cpp``) checks the type keys, that the architecture
equals the base GGUF's, and each pair's shapes against the base tensor of the same name.

How the numbers map:

* **Rotary rows.** For the ``llama`` architecture the base GGUF's q/k rows are permuted
  (:func:`~qlora_orpo.export.gguf.permute_qk`); ``P W + P B A = P (W + B A)``, so B's rows get
  the same permutation and A is unchanged. Qwen2 keeps transformers' layout.
* **Scale.** llama.cpp applies ``alpha / rank`` with ``rank = lora_b.ne[0]``; peft applies
  ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA). The file's alpha is
  ``scale * r``: ``lora_alpha`` itself, or ``lora_alpha * sqrt(r)`` for rsLoRA, so that
  ``alpha / r = lora_alpha / sqrt(r)``. One alpha serves the whole file; a layer whose rank
  (peft's ``rank_pattern``) would get another scale has the ratio folded into its B.
* **Refused, in one line:** DoRA (llama.cpp has no magnitude vector), LoRA on embeddings or on a
  tied ``lm_head`` (the base GGUF has no ``output`` tensor to attach it to), trained full
  modules (``modules_to_save``), LoRA biases, and peft options with no llama.cpp form;
  an unsupported architecture before any weight is loaded.

The base the adapter runs on is :func:`~qlora_orpo.export.gguf.export_gguf` without an adapter
(``base-<quant>.gguf`` beside the adapter file, unless ``base_gguf`` names one already written).
Verification: :mod:`qlora_orpo.export.gguf_lora_check`.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.files import atomic_write_text, fsync_dir
from .adapters import WEIGHTS_FILE, adapter_tokenizer_dir, read_adapter, resolve_base
from .card import public_name
from .gguf import OURS_KEY, PERMUTE_QK, _check_outputs, export_gguf, gguf_arch, permute_qk
from .gguf_llamacpp import llama_cpp_available
from .gguf_lora_check import LlamaCppCheck, check_structure, run_llama_cpp, tensor_name_map
from .gguf_verify import GREEDY_TOKENS, QUANTS
from .gguf_vocab import end_of_turn_token, render_modelfile
from .merged import log
from .verify import VERIFY_MAX_TOKENS, ExportError

PEFT_PREFIX = "base_model.model."
# peft options whose effect a llama.cpp LoRA adapter (x + alpha/r * B A x per linear layer) cannot carry.
# (use_dora has its own message.) alpha_pattern: one alpha per file, and peft's pattern matching is not redone here.
NO_LLAMA_CPP_FORM = ("lora_bias", "modules_to_save", "trainable_token_indices", "alora_invocation_tokens",
                     "layer_replication", "use_qalora", "target_parameters", "use_bdlora", "alpha_pattern")


@dataclass
class GGUFLoraResult:
    path: str
    modelfile: str
    base_gguf: str
    bytes: int
    seconds: float
    alpha: float  # adapter.lora.alpha as written (llama.cpp's scale is alpha / rank)
    ranks: list[int]
    pairs: int  # adapted layers (two tensors each)
    judge: str  # "llama.cpp" or "structural" (llama-cpp-python not installed) or "none"
    structural_max_diff: float | None  # max |file's scale * B A - P(peft delta)| / max |peft delta|
    llama_cpp: LlamaCppCheck | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Adapter -> GGUF tensors
# ---------------------------------------------------------------------------------------------


def check_peft_config(peft_config: dict[str, Any], where: str) -> None:
    """Refuse, on one line, an adapter whose peft options have no llama.cpp form (DoRA first: the likeliest)."""
    if peft_config.get("peft_type") != "LORA":
        raise ExportError(f"{where}: a {peft_config.get('peft_type')} adapter has no llama.cpp form; only LoRA has")
    if peft_config.get("use_dora"):
        raise ExportError(f"{where}: DoRA adapters cannot be llama.cpp adapters (llama.cpp has no DoRA); "
                          "export the merged model instead (--format gguf)")
    if peft_config.get("bias", "none") != "none":
        raise ExportError(f"{where}: bias={peft_config['bias']!r} trains biases, which a llama.cpp adapter cannot hold")
    for option in NO_LLAMA_CPP_FORM:
        if peft_config.get(option):
            raise ExportError(f"{where}: peft option {option} has no llama.cpp adapter form; "
                              "export the merged model instead (--format gguf)")


def lora_pairs(tensors: dict[str, torch.Tensor], where: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module name: (A (r, in), B (out, r))}`` from peft's saved keys; anything else refused on one line."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        if "lora_embedding_" in name or ".embed_tokens." in name:
            raise ExportError(f"{where}: {key} adapts the embeddings; llama.cpp adapters here cover linear layers only")
        # peft's copy of a base weight (save_embedding_layers): skipped, as llama.cpp's converter
        # skips it, because the base GGUF already holds that weight.
        if name.endswith(".base_layer.weight"):
            continue
        for part in ("lora_A", "lora_B"):
            if name.endswith(f".{part}.weight"):
                pairs.setdefault(name.removesuffix(f".{part}.weight"), {})[part] = value
                break
        else:
            raise ExportError(f"{where}: {key} is not a LoRA A/B matrix; a llama.cpp adapter holds nothing else")
    if not pairs:
        raise ExportError(f"{where}: holds no LoRA A/B matrices")
    for module, pair in pairs.items():
        if len(pair) != 2:
            raise ExportError(f"{where}: {module} has only {', '.join(pair)}")
        a, b = pair["lora_A"], pair["lora_B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ExportError(f"{where}: {module} has A {tuple(a.shape)} and B {tuple(b.shape)}, not (r, in) and (out, r)")
    return {module: (p["lora_A"], p["lora_B"]) for module, p in sorted(pairs.items())}


def peft_scale(peft_config: dict[str, Any], rank: int) -> float:
    """peft's ``scaling`` of a layer of rank ``rank``: ``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA."""
    alpha = float(peft_config.get("lora_alpha", 8))
    return alpha / math.sqrt(rank) if peft_config.get("use_rslora") else alpha / rank


def file_alpha(peft_config: dict[str, Any], ranks: list[int]) -> float:
    """The one ``adapter.lora.alpha`` that gives the commonest rank peft's scale under llama.cpp's ``alpha / rank``."""
    rank = Counter(ranks).most_common(1)[0][0]
    return peft_scale(peft_config, rank) * rank


def gguf_lora_tensors(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], config: Any, arch: str,
                      peft_config: dict[str, Any], where: str) -> tuple[dict[str, np.ndarray], float]:
    """``({"blk.N.<name>.weight.lora_a": A, ...lora_b: B}, alpha)`` as float32 arrays, B permuted and rescaled where needed.

    A tied ``lm_head`` is refused: llama.cpp's base GGUF has no ``output.weight`` to attach it to.
    """
    names = tensor_name_map(arch, config.num_hidden_layers)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    ranks = [a.shape[0] for a, _ in pairs.values()]
    alpha = file_alpha(peft_config, ranks)
    out: dict[str, np.ndarray] = {}
    for module, (a, b) in pairs.items():
        if module.split(".")[-1] == "lm_head" and getattr(config, "tie_word_embeddings", False):
            raise ExportError(f"{where}: the adapter adapts lm_head, which this base ties to its embeddings; "
                              "llama.cpp cannot apply it (export the merged model: --format gguf)")
        target = names.get_name(f"{module}.weight", try_suffixes=(".weight",))
        if target is None:
            raise ExportError(f"{where}: {module} has no GGUF tensor name for {arch}")
        rank = a.shape[0]
        b = b.float()
        ratio = peft_scale(peft_config, rank) / (alpha / rank)
        if not math.isclose(ratio, 1.0, rel_tol=1e-6):  # another rank than the commonest: fold its scale into B
            b = b * ratio
        if arch in PERMUTE_QK and ".attn_q." in target:
            b = permute_qk(b, heads)
        elif arch in PERMUTE_QK and ".attn_k." in target:
            b = permute_qk(b, kv_heads)
        out[f"{target}.lora_a"] = np.ascontiguousarray(a.float().numpy())
        out[f"{target}.lora_b"] = np.ascontiguousarray(b.numpy())
    return out, alpha


def write_gguf_lora(path: Path, tensors: dict[str, np.ndarray], arch: str, alpha: float, name: str, adapter: str) -> None:
    """The adapter file; ``adapter`` (its directory) is recorded under OURS_KEY so that a later export may replace it."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(name)
    writer.add_string(OURS_KEY, adapter)
    for tensor_name, data in tensors.items():
        writer.add_tensor(tensor_name, data, raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with open(path, "rb") as handle:  # durable before the rename that publishes it
        os.fsync(handle.fileno())


def adapter_modelfile(base_ref: str, adapter_name: str, tokenizer: Any, system: str | None, add_bos: bool) -> str:
    """gguf_vocab's Modelfile (template, stops; ``add_bos``: the base GGUF's flag) with ``FROM base_ref``, ``ADAPTER``."""
    lines = render_modelfile("base.gguf", tokenizer, end_of_turn_token(tokenizer), system, add_bos).splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("FROM "))
    lines[at:at + 1] = [f"FROM {base_ref}", f"ADAPTER ./{adapter_name}"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def export_gguf_lora(
    adapter_dir: str | Path,
    out_path: str | Path,
    *,
    base: str | None = None,
    base_gguf: str | Path | None = None,
    base_quant: str = "f16",
    force: bool = False,
    verify: bool = True,
    texts: list[str] | None = None,
    max_tokens: int = VERIFY_MAX_TOKENS,
    greedy_tokens: int = GREEDY_TOKENS,
) -> GGUFLoraResult:
    """Write the adapter as ``out_path`` (``.gguf``; a directory gets ``adapter-f32.gguf``) and a Modelfile beside it.

    ``base_gguf``: the base's GGUF, already written (``--format gguf`` without ``--adapter``);
    by default ``base-<base_quant>.gguf`` is exported beside the adapter file. Verification
    (:mod:`qlora_orpo.export.gguf_lora_check`): always the structural check against peft's delta
    weights; with llama-cpp-python installed, llama.cpp running base GGUF + adapter file against
    base + adapter in peft (float32). ``base``/``force``/``texts`` as in ``export_gguf``.
    """
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    start = time.perf_counter()
    if base_quant not in QUANTS:
        raise ExportError(f"quant: {base_quant!r} is not one of {', '.join(QUANTS)}")
    out = Path(out_path)
    if out.suffix != ".gguf":
        if out.exists() and not out.is_dir():
            raise ExportError(f"{out}: exists and is not a directory; give a directory or a name ending in .gguf")
        out = out / "adapter-f32.gguf"
    modelfile = out.parent / "Modelfile"
    _check_outputs(out, modelfile)
    info = read_adapter(adapter_dir, require_card=not force)
    where = str(info.path)
    check_peft_config(info.peft_config, where)
    base_path = resolve_base(info, base)
    try:
        config = AutoConfig.from_pretrained(base_path)
        arch = gguf_arch(config, f"base {base_path}")  # refuse before loading any weight
        tokenizer = AutoTokenizer.from_pretrained(adapter_tokenizer_dir(info.path) or base_path)
    except (OSError, ValueError) as exc:
        raise ExportError(f"base {base_path}: cannot load ({str(exc).splitlines()[0]})") from exc
    pairs = lora_pairs(load_file(str(info.path / WEIGHTS_FILE)), where)
    tensors, alpha = gguf_lora_tensors(pairs, config, arch, info.peft_config, where)
    if base_gguf is not None:
        base_file = Path(base_gguf)
        _check_base_gguf(base_file, arch)
    else:
        base_file = out.parent / f"base-{base_quant}.gguf"
        log(f"writing the base GGUF {base_file} ({base_quant}) for the adapter to run on")
        export_gguf(None, base_file, base_quant, base=base_path, verify=verify)
    card = (info.card or {}).get("qlora_orpo", {})
    name = f"{card.get('base', {}).get('name') or Path(base_path).name} ORPO LoRA"

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    structural, llama, judge = None, None, "none"
    try:
        log(f"writing {out} ({len(pairs)} LoRA pairs, F32, alpha {alpha:.6g})")
        # The adapter by its directory's name: a shared file must not carry this machine's paths.
        write_gguf_lora(tmp, tensors, arch, alpha, name, public_name(str(info.path.resolve())))
        if verify:
            structural, llama, judge = _verify(tmp, info, base_path, base_file, tokenizer, config, arch, force,
                                               texts, max_tokens, greedy_tokens)
        size = tmp.stat().st_size
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    base_ref = f"./{base_file.name}" if base_file.resolve().parent == out.resolve().parent else str(base_file.resolve())
    system = (card.get("training") or {}).get("system_prompt") or None
    fields = gguf.GGUFReader(str(base_file)).fields
    add_bos = bool(fields["tokenizer.ggml.add_bos_token"].contents()) if "tokenizer.ggml.add_bos_token" in fields else False
    atomic_write_text(modelfile, adapter_modelfile(base_ref, out.name, tokenizer, system, add_bos))
    result = GGUFLoraResult(path=str(out), modelfile=str(modelfile), base_gguf=str(base_file), bytes=size,
                            seconds=time.perf_counter() - start, alpha=alpha,
                            ranks=sorted({a.shape[0] for a, _ in pairs.values()}), pairs=len(pairs), judge=judge,
                            structural_max_diff=structural, llama_cpp=llama)
    log(f"wrote {out} ({size / 1e6:.2f} MB) and {modelfile} (FROM {base_ref}); judge: {judge}; "
        f"{result.seconds:.1f} s")
    return result


def _check_base_gguf(path: Path, arch: str) -> None:
    """A given base GGUF must be a model file of the adapter's architecture (llama.cpp refuses a mismatch)."""
    import gguf

    if not path.is_file():
        raise ExportError(f"{path}: no such base GGUF; export one with --format gguf --model <base>")
    try:
        fields = gguf.GGUFReader(str(path)).fields
        found = fields["general.architecture"].contents()
        kind = fields["general.type"].contents() if "general.type" in fields else "model"
    except Exception as exc:  # noqa: BLE001 - any unreadable file is refused the same way
        raise ExportError(f"{path}: not a readable GGUF ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if found != arch or kind != "model":
        raise ExportError(f"{path}: a {kind} GGUF of architecture {found!r}; the adapter needs a {arch} model GGUF")


def _verify(tmp: Path, info: Any, base_path: str, base_file: Path, tokenizer: Any, config: Any, arch: str,
            force: bool, texts: list[str] | None, max_tokens: int, greedy_tokens: int
            ) -> tuple[float, LlamaCppCheck | None, str]:
    """Structural check always; llama.cpp's when it is installed. Returns (structural diff, llama.cpp check, judge)."""
    from ..models.loader import load_base
    from .adapters import load_adapter
    from .verify import encode_texts, verification_texts

    model = load_base(base_path, "none", "cpu", torch.float32)
    peft_model = load_adapter(model, tokenizer, info.path, force=force).eval()
    structural = check_structure(tmp, peft_model, config, arch, base_file)
    log(f"structural check: file's scale * B A equals peft's delta weights (max relative difference {structural:.2g})")
    if not llama_cpp_available():
        log("llama-cpp-python is not installed: verified structurally only")
        return structural, None, "structural"
    if texts is None:
        texts, _ = verification_texts(info, tokenizer)
    ids = encode_texts(tokenizer, texts, max_tokens)
    llama = run_llama_cpp(tmp, base_file, peft_model, ids, greedy_tokens, arch)
    log(f"llama.cpp (base GGUF + adapter) vs peft float32: max |logit difference| {llama.max_abs_diff:.3g} <= "
        f"{llama.tolerance:.3g}, top-1 agreement {llama.top1_agreement:.3f}, greedy identical "
        f"{llama.greedy_identical}/{llama.greedy_runs}")
    if llama.adapter_effect <= llama.tolerance:
        log(f"note: the adapter moves logits by at most {llama.adapter_effect:.3g}, within the tolerance "
            f"{llama.tolerance:.3g}; this check cannot tell an applied adapter from a missing one")
    return structural, llama, "llama.cpp"
