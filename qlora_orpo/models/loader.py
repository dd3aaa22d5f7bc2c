"""The one base loader (training, evaluation, chat, export), model paths, devices and dtypes.

:func:`load_base` is how every command loads a base: bitsandbytes 4-bit (NF4/FP4 with
double quantisation) or unquantised, on the chosen device, with the bitsandbytes CPU
repacking work-around applied. :func:`load_model_for_training` adds the standard QLoRA
preparation (frozen base, gradient checkpointing) and a fresh LoRA adapter.

Dtypes: the 4-bit layers compute in the compute dtype, and the tensors that stay
unquantised (embeddings, norms), hence the residual stream between layers and the
``lm_head``, are stored in it too, on every device: bfloat16 where that is the faster
(``resolve_compute_dtype``), as a bf16 QLoRA on a GPU does. Measured here (AMD EPYC with
AVX512-BF16, one split step of the embedded model at 512 tokens): float32 residual with
bfloat16 compute 3.52 s, all bfloat16 2.90 s; on a GPU it halves activation memory and
enables the fused SDPA/FlashAttention kernels, which take only 16-bit inputs. LoRA weights
and optimizer states stay float32 everywhere (peft's ``autocast_adapter_dtype``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..config import EMBEDDED, OrpoConfig
from ..core.errors import ConfigError, ModelError
from ..core.launcher import sharding_from_env
from .bnb_cpu import disable_bnb_cpu_repacking, import_bitsandbytes_quietly
from .checkpointing import CheckpointingChoice, checkpointing_for
from .embedded import embedded_model_dir, gguf_model_dir
from .lora_forward import use_lean_lora_forward
from .memory import malloc_trim

if TYPE_CHECKING:  # heavy imports only for type checkers; loaded lazily at run time
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# A hub id is "name" or "owner/name" made of these characters; anything else is a path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
QUANT_TYPES = ("nf4", "fp4", "none")


# ---------------------------------------------------------------------------------------------
# Model paths, devices and dtypes
# ---------------------------------------------------------------------------------------------


def resolve_model_path(name: str) -> str:
    """A local directory holding the model named by ``name``.

    ``"embedded"`` is the converted SmolLM2 model; a ``.gguf`` file is converted once into the
    cache (:func:`~qlora_orpo.models.embedded.gguf_model_dir`); an existing directory is used as it is;
    anything else that looks like a hub id is looked up in the local Hugging Face cache,
    then downloaded if the hub is reachable (not in offline mode).
    """
    if name == EMBEDDED:
        return str(embedded_model_dir())
    path = Path(name).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":  # a GGUF the user already has: converted once
        return str(gguf_model_dir(path))
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"model {name}: is a file; expected a transformers model directory or a .gguf file")
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
    """``"auto"`` is the current CUDA device when there is one, else the CPU.

    Under several ranks (``WORLD_SIZE`` > 1) a bare ``cuda`` is the rank's own GPU, ``cuda:LOCAL_RANK``.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        name = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
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



_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def cuda_has_native_bf16(device: torch.device) -> bool:
    """True on GPUs that run bfloat16 in hardware (Ampere, compute capability 8.0, and later).

    ``torch.cuda.is_bf16_supported()`` also counts emulation (T4, RTX 20xx), where
    bfloat16 is slower than float16 and has no tensor-core path.
    """
    return torch.cuda.get_device_capability(device)[0] >= 8


def resolve_compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype the 4-bit layers compute in. ``"auto"``:

    * CUDA: bfloat16 where the GPU runs it natively, else float16 (trained with loss scaling).
    * CPU: whichever of float32 and bfloat16 measured faster on this machine
      (``dtype_probe.fastest_cpu_dtype``); CPU flags are no guide: oneDNN reports native
      bfloat16 here while a float32 matmul runs twice as fast.
    """
    if name != "auto":
        if name not in _DTYPES:
            raise ConfigError(f"compute_dtype: {name!r} is not one of auto, bfloat16, float16, float32")
        return _DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if cuda_has_native_bf16(device) else torch.float16
    return _fastest_cpu_dtype()


def _fastest_cpu_dtype() -> torch.dtype:
    try:
        from .dtype_probe import fastest_cpu_dtype
    except ImportError:  # the probe module is optional; float32 is the measured default here
        return torch.float32
    return fastest_cpu_dtype()


def device_map(device: torch.device) -> dict[str, int | str]:
    """Everything on one device (bitsandbytes then quantises the weights there)."""
    return {"": device.index if device.type == "cuda" and device.index is not None else str(device)}


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_tokenizer(path: str | Path, chat_template: str = "") -> PreTrainedTokenizerBase:
    """The model's tokenizer; it must have an EOS token, which also pads when there is no pad token.

    ``chat_template``: a built-in template's name or a jinja file to use instead of the tokenizer's
    own (``data/chat_templates.py``); empty keeps the tokenizer's.
    """
    from transformers import AutoTokenizer

    from ..data.chat_templates import apply_chat_template

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError) as exc:
        raise ModelError(f"model {path}: cannot load its tokenizer ({_first_line(exc)})") from exc
    if tokenizer.eos_token is None or tokenizer.eos_token_id is None:
        raise ModelError(f"model {path}: the tokenizer has no EOS token, so responses cannot be terminated")
    if tokenizer.pad_token is None:
        # Padding positions are masked out of every loss, so any token id works; EOS is always there.
        tokenizer.pad_token = tokenizer.eos_token
    apply_chat_template(tokenizer, chat_template, f"model {path}")
    return tokenizer


@dataclass
class ModelInfo:
    path: str
    device: torch.device
    compute_dtype: torch.dtype
    quant: str
    trainable_params: int
    total_params: int
    loaded_by_rank0: bool = False  # FSDP2: rank 0 read the checkpoint, the other ranks a skeleton
    checkpointing: CheckpointingChoice | None = None

    def describe(self) -> str:
        share = 100.0 * self.trainable_params / self.total_params if self.total_params else 0.0
        base = f"{self.quant} base" if self.quant != "none" else "unquantised base"
        dtype = str(self.compute_dtype).removeprefix("torch.")
        return (
            f"trainable {self.trainable_params:,} / total {self.total_params:,} ({share:.1f}%); "
            f"{base}, {dtype} compute on {self.device}"
            + ("; loaded by rank 0 alone, sharded from it (fsdp2)" if self.loaded_by_rank0 else "")
            + (f"; {self.checkpointing.describe()}" if self.checkpointing else "")
        )


def load_base(
    path: str,
    quant: str = "none",
    device: torch.device | str = "cpu",
    compute_dtype: torch.dtype = torch.float32,
    *,
    dtype: torch.dtype | None = None,
    name: str | None = None,
    quant_storage: torch.dtype | None = None,
) -> PreTrainedModel:
    """The base model at ``path`` as every command loads it, frozen, in eval mode.

    ``quant`` ``"nf4"``/``"fp4"``: bitsandbytes 4-bit with double quantisation computing in
    ``compute_dtype``; ``"none"``: no quantisation. The unquantised tensors are stored in
    ``dtype`` (default ``compute_dtype``, see the module docstring). The bitsandbytes CPU
    repacking work-around is applied before anything can run a forward. ``name`` is what
    errors call the model (default ``path``). ``quant_storage``: the dtype the packed 4-bit
    weights are stored in (default uint8); FSDP2 needs the compute dtype there, so that a
    layer's 4-bit and LoRA parameters share one float dtype it can flatten and shard.
    """
    from transformers import AutoModelForCausalLM

    if quant not in QUANT_TYPES:
        raise ConfigError(f"quant: {quant!r} is not one of {', '.join(QUANT_TYPES)}")
    device = torch.device(device)
    kwargs: dict[str, Any] = {"device_map": device_map(device)}
    kwargs["dtype"] = dtype or compute_dtype
    if quant != "none":
        import_bitsandbytes_quietly(required=True)
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_storage=quant_storage or torch.uint8,
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model {name or path}: cannot load ({_first_line(exc)})") from exc
    disable_bnb_cpu_repacking(model)  # before any no-grad forward (see its docstring)
    model.requires_grad_(False)
    if quant != "none" and device.type == "cpu":
        _copy_out_of_checkpoint_mmap(model)
        malloc_trim()  # return the quantisation scratch memory to the OS (about 230 MB here)
    model.eval()
    return model


def load_model_for_training(cfg: OrpoConfig) -> tuple[PeftModel, PreTrainedTokenizerBase, ModelInfo]:
    """Load the base (4-bit unless ``cfg.quant == "none"``) and wrap it with a fresh LoRA adapter."""
    # Before peft: importing peft imports bitsandbytes, which would print its warning.
    import_bitsandbytes_quietly(required=cfg.quant != "none")
    from peft import LoraConfig, get_peft_model

    path = resolve_model_path(cfg.model)
    device = select_device(cfg.device)
    compute_dtype = resolve_compute_dtype(cfg.compute_dtype, device)
    tokenizer = load_tokenizer(path, cfg.chat_template)
    # Sharded (FSDP2) runs store the packed 4-bit weights in the compute dtype (peft's FSDP-QLoRA recipe).
    sharded = sharding_from_env() == "fsdp2"
    quant_storage = compute_dtype if sharded else None
    rank0_loads = sharded and cfg.quant != "none" and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    if rank0_loads:
        model = _load_base_on_rank0(path, cfg, device, compute_dtype, quant_storage)
    else:
        model = load_base(path, cfg.quant, device, compute_dtype, name=cfg.model, quant_storage=quant_storage)
    checkpointing = checkpointing_for(cfg, model, device)
    # The QLoRA preparation, without peft's prepare_model_for_kbit_training: that upcasts
    # every 16-bit tensor to float32, doubling the residual stream's memory on a GPU.
    if checkpointing.enabled:
        _enable_checkpointing(model)
        model.enable_input_require_grads()

    targets: str | list[str]
    if cfg.lora_targets.strip() == "all-linear":
        targets = "all-linear"  # peft: every nn.Linear / Linear4bit except the output layer
    else:
        targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(cfg.seed)  # LoRA A is initialised randomly; make it reproducible
    try:
        with quiet_checkpointing_renames():
            # autocast_adapter_dtype: LoRA weights in float32 whatever the base's dtype.
            peft_model = get_peft_model(model, lora, autocast_adapter_dtype=True)
    except ValueError as exc:
        raise ConfigError(f"lora_targets: {_first_line(exc)}") from exc
    use_lean_lora_forward(peft_model)  # no clone, no [tokens, in] casts per 4-bit layer (lora_forward.py)

    trainable, total = peft_model.get_nb_trainable_parameters()  # counts 4-bit weights unpacked
    info = ModelInfo(
        path=path,
        device=device,
        compute_dtype=compute_dtype,
        quant=cfg.quant,
        trainable_params=int(trainable),
        total_params=int(total),
        loaded_by_rank0=rank0_loads,
        checkpointing=checkpointing,
    )
    return peft_model, tokenizer, info


def _load_base_on_rank0(
    path: str, cfg: OrpoConfig, device: torch.device, compute_dtype: torch.dtype, quant_storage: torch.dtype | None
) -> PreTrainedModel:
    """FSDP2 over several ranks: rank 0 alone reads and quantises the checkpoint, into host memory
    when the ranks train on GPUs (each GPU then receives only its shard); the other ranks get a
    meta skeleton with rank 0's quant states (rank0_load.py; training/distributed.shard_fsdp2 fills it)."""
    from transformers import AutoConfig

    from .rank0_load import share_4bit_base

    loaded = None
    if torch.distributed.get_rank() == 0:
        host = torch.device("cpu") if device.type == "cuda" else device
        loaded = load_base(path, cfg.quant, host, compute_dtype, name=cfg.model, quant_storage=quant_storage)
    return share_4bit_base(loaded, AutoConfig.from_pretrained(path), compute_dtype, compute_dtype)


def _enable_checkpointing(model: PreTrainedModel) -> None:
    """Gradient checkpointing with use_reentrant=False under its transformers 5 name (older: the old one)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # pragma: no cover - transformers < 5.x
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@contextlib.contextmanager
def quiet_checkpointing_renames() -> Iterator[None]:
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
            if tensor.dtype == torch.uint8 or hasattr(tensor, "quant_state"):  # packed 4-bit: bitsandbytes-owned
                continue
            tensor.data = tensor.data.clone()
            copied += tensor.numel() * tensor.element_size()
    return copied


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
