"""Tests of qlora_orpo.models.loader.

The integration tests use the embedded SmolLM2-135M model; it is converted once into the
cache (``$QLORA_ORPO_CACHE`` or ``~/.cache/qlora_orpo``) and loaded once per module.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from qlora_orpo.config import OrpoConfig
from qlora_orpo.core.errors import ConfigError, ModelError
from qlora_orpo.models import embedded as E
from qlora_orpo.models import loader as M

bnb = pytest.importorskip("bitsandbytes")

N_LAYERS = 30  # SmolLM2-135M
BASE_PARAMS = 134_515_008  # its parameter count, lm_head tied to the embedding
LORA_R16_ALL_LINEAR = 4_884_480  # 30 layers x 16 x (q 576+576, k/v 576+192, o 576+576, mlp 3 x 576+1536)


def _cpu_has_avx512_bf16() -> bool:
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _batch(tokenizer) -> dict[str, torch.Tensor]:
    messages = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
    ]
    ids = tokenizer.apply_chat_template(messages, return_tensors="pt", return_dict=True)["input_ids"]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _lora_params(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def _set_lora_b(model, seed: int, scale: float = 0.01) -> None:
    """Give every LoRA B a small non-zero value, so that LoRA A receives gradients too."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in _lora_params(model).items():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def _zero_lora_b(model) -> None:
    with torch.no_grad():
        for name, param in _lora_params(model).items():
            if "lora_B" in name:
                param.zero_()


def _lora_grads(model, batch) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and LoRA gradients of a fixed next-token loss, in train mode."""
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(**batch, labels=batch["input_ids"], use_cache=False)
    out.loss.backward()
    grads = {
        n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
        for n, p in _lora_params(model).items()
    }
    model.zero_grad(set_to_none=True)
    return out.loss.item(), grads


def _evaluate_and_generate(model, batch) -> None:
    """What an evaluation pass and a sample generation do to the model between training steps."""
    model.eval()
    with torch.no_grad():
        model(**batch)
    model.generate(**batch, max_new_tokens=2, do_sample=False)
    model.train()


def _linear4bit(model) -> list:
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def _packed(model) -> int:
    return sum(
        bool(getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False))
        for m in _linear4bit(model)
    )


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded_dir() -> Path:
    return E.embedded_model_dir()


@pytest.fixture(scope="module")
def lora_model(embedded_dir):
    """The 4-bit embedded model with LoRA r=16 on all linear layers (dropout 0: exact gradients)."""
    cfg = OrpoConfig(device="cpu", quant="nf4", lora_r=16, lora_targets="all-linear", lora_dropout=0.0)
    return M.load_model_for_training(cfg)


# --------------------------------------------------------------------------------------------
# (1) the embedded model conversion
# --------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_converted_dir_is_a_plain_transformers_model_with_the_gguf_logits(embedded_dir):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((embedded_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is True
    with safe_open(str(embedded_dir / "model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
        assert fh.get_slice("model.embed_tokens.weight").get_dtype() == "F32"
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    marker = json.loads((embedded_dir / E.MARKER_FILE).read_text())
    assert marker["gguf_sha256"] == E._sha256(E.embedded_gguf_path())

    gguf = E.embedded_gguf_path()
    converted = AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32).eval()
    original = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    assert converted.lm_head.weight.data_ptr() == converted.model.embed_tokens.weight.data_ptr()
    original_state = original.state_dict()
    for name, tensor in converted.state_dict().items():
        assert torch.equal(tensor, original_state[name]), name

    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
    gguf_tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    assert (
        tokenizer.chat_template == gguf_tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    )
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|im_end|>")
    assert tokenizer.model_max_length == config["max_position_embeddings"]
    batch = _batch(tokenizer)
    assert torch.equal(batch["input_ids"], _batch(gguf_tokenizer)["input_ids"])
    with torch.no_grad():
        logits = converted(**batch).logits
        reference = original(**batch).logits
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-5)


@pytest.mark.integration
def test_conversion_is_reused(embedded_dir, monkeypatch):
    monkeypatch.setattr(E, "_convert_gguf", lambda *a: pytest.fail("converted again"))
    assert E.embedded_model_dir() == embedded_dir


def _fake_converter(calls: list[Path], fail: bool = False):
    def convert(gguf: Path, out: Path, label: str = "") -> None:
        calls.append(out)
        (out / "config.json").write_text("{}")
        if fail:
            raise RuntimeError("killed half-way")
        (out / E.MARKER_FILE).write_text(json.dumps(E._source_marker(gguf)))

    return convert


def test_stale_cache_is_replaced_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv(E.CACHE_ENV, str(tmp_path))
    stale = tmp_path / E.EMBEDDED_DIRNAME
    stale.mkdir()
    marker = E._source_marker(E.embedded_gguf_path()) | {"gguf_sha256": "0" * 64, "gguf_mtime_ns": 1}
    (stale / E.MARKER_FILE).write_text(json.dumps(marker))
    (stale / "old-file").write_text("from another package version")
    (tmp_path / f".{E.EMBEDDED_DIRNAME}.tmp-killed").mkdir()  # left by a killed conversion

    # A failing conversion leaves the stale cache as it was and no half-written directory.
    calls: list[Path] = []
    monkeypatch.setattr(E, "_convert_gguf", _fake_converter(calls, fail=True))
    with pytest.raises(RuntimeError, match="half-way"):
        E.embedded_model_dir()
    assert (stale / "old-file").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [E.EMBEDDED_DIRNAME]

    # A different GGUF (sha) triggers a fresh conversion that replaces the old directory.
    monkeypatch.setattr(E, "_convert_gguf", _fake_converter(calls))
    assert E.embedded_model_dir() == stale
    assert len(calls) == 2 and not (stale / "old-file").exists() and (stale / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [E.EMBEDDED_DIRNAME]

    # Current now: no conversion, even when only the mtime changed (re-install of the same file).
    monkeypatch.setattr(E, "_convert_gguf", lambda *a: pytest.fail("converted again"))
    marker = json.loads((stale / E.MARKER_FILE).read_text()) | {"gguf_mtime_ns": 1}
    (stale / E.MARKER_FILE).write_text(json.dumps(marker))
    assert E.embedded_model_dir() == stale


def test_unwritable_cache_is_a_model_error(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv(E.CACHE_ENV, str(blocker / "cache"))
    with pytest.raises(ModelError, match=E.CACHE_ENV):
        E.embedded_model_dir()


# --------------------------------------------------------------------------------------------
# (2) the bitsandbytes CPU repacking bug
# --------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_eval_and_generate_leave_lora_gradients_unchanged(lora_model):
    model, tokenizer, info = lora_model
    batch = _batch(tokenizer)
    _set_lora_b(model, seed=1)
    try:
        loss_before, before = _lora_grads(model, batch)
        _evaluate_and_generate(model, batch)
        loss_after, after = _lora_grads(model, batch)
    finally:
        _zero_lora_b(model)
    assert _packed(model) == 0
    assert len(before) == 2 * 7 * N_LAYERS
    assert loss_after == loss_before
    zero = [n for n, g in after.items() if not g.any()]
    assert not zero, f"{len(zero)} LoRA parameters got no gradient, e.g. {zero[:3]}"
    changed = [n for n in before if not torch.allclose(after[n], before[n], rtol=1e-6, atol=1e-9)]
    assert not changed, f"{len(changed)} of {len(before)} LoRA gradients changed after eval/generate"


@pytest.mark.integration
@pytest.mark.skipif(
    not _cpu_has_avx512_bf16(),
    reason="the repacking bug needs a CPU with avx512_bf16 (absent from /proc/cpuinfo here)",
)
def test_without_the_workaround_eval_breaks_lora_gradients(embedded_dir):
    """Shows the bug that disable_bnb_cpu_repacking works around, and that it also repairs it."""
    cfg = OrpoConfig(device="cpu", lora_dropout=0.0)
    model, tokenizer, info = M.load_model_for_training(cfg)
    assert all(not m.support_avx512bf16_for_cpu for m in _linear4bit(model))
    batch = _batch(tokenizer)

    _set_lora_b(model, seed=1)
    loss_before, before = _lora_grads(model, batch)
    for module in _linear4bit(model):  # undo the workaround: bitsandbytes' own behaviour
        module.support_avx512bf16_for_cpu = True
    _evaluate_and_generate(model, batch)
    if _packed(model) == 0:
        pytest.skip("this bitsandbytes no longer repacks 4-bit weights in eval mode")
    assert _packed(model) == 7 * N_LAYERS

    with warnings.catch_warnings():
        # torch warns that gemv_4bit has no autograd kernel: the mechanism of the bug
        warnings.simplefilter("ignore", UserWarning)
        loss_broken, broken = _lora_grads(model, batch)
        _zero_lora_b(model)  # a fresh adapter, as at the start of training
        _, fresh = _lora_grads(model, batch)
    wrong = [n for n in before if not torch.allclose(broken[n], before[n], rtol=1e-2, atol=0)]
    assert len(wrong) == len(before), f"only {len(wrong)} of {len(before)} gradients changed"
    stalled = [n for n, g in fresh.items() if "lora_B" in n and not g.any()]
    # q, k, v, gate and up get exactly zero gradient in every layer; o and down still learn
    assert len(stalled) == 5 * N_LAYERS, f"{len(stalled)} of {7 * N_LAYERS} LoRA B got no gradient"

    # disable_bnb_cpu_repacking also unpacks an already-packed model (best effort: the
    # double-quantised absmax is re-quantised), after which gradients flow everywhere again.
    assert M.disable_bnb_cpu_repacking(model) == 7 * N_LAYERS
    assert _packed(model) == 0
    _, fresh = _lora_grads(model, batch)
    assert all(g.any() for n, g in fresh.items() if "lora_B" in n)
    _set_lora_b(model, seed=1)
    loss_repaired, repaired = _lora_grads(model, batch)
    assert all(g.any() for g in repaired.values())
    assert abs(loss_repaired - loss_before) < 0.05 * loss_before
    _evaluate_and_generate(model, batch)
    _, again = _lora_grads(model, batch)
    assert all(torch.allclose(again[n], repaired[n], rtol=1e-6, atol=1e-9) for n in repaired)


def _tiny_4bit(n_layers: int = 2) -> torch.nn.Sequential:
    torch.manual_seed(0)
    layers = [
        bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
        for _ in range(n_layers)
    ]
    return torch.nn.Sequential(*layers).to("cpu")  # .to quantises the weights


def test_disable_repacking_on_tiny_layers():
    model = _tiny_4bit()
    for module in model:
        module.support_avx512bf16_for_cpu = True  # as on an AVX512-BF16 CPU
    assert M.disable_bnb_cpu_repacking(model) == 2
    assert all(m.support_avx512bf16_for_cpu is False for m in model)
    assert M.disable_bnb_cpu_repacking(model) == 0  # idempotent
    x = torch.randn(3, 64)
    model.eval()
    with torch.no_grad():
        model(x)
    assert _packed(model) == 0
    model.train()
    x.requires_grad_(True)
    model(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_disable_repacking_unpacks_a_packed_layer():
    model = _tiny_4bit(1)
    x = torch.randn(3, 64)
    with torch.no_grad():
        reference = model(x)
    model[0].support_avx512bf16_for_cpu = True
    model.eval()
    with torch.no_grad():
        packed_out = model(x)
    if _packed(model) == 0:
        pytest.skip("this bitsandbytes does not repack on the CPU")
    assert M.disable_bnb_cpu_repacking(model) == 1
    assert _packed(model) == 0
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference, rtol=0.05, atol=0.05)
        torch.testing.assert_close(model(x), packed_out, rtol=0.05, atol=0.05)


def test_disable_repacking_without_4bit_layers():
    assert M.disable_bnb_cpu_repacking(torch.nn.Linear(4, 4)) == 0


# --------------------------------------------------------------------------------------------
# (3) what gets trained
# --------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_trainable_parameters_are_exactly_the_lora_parameters(lora_model):
    model, _, info = lora_model
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable.keys() == _lora_params(model).keys()
    assert info.trainable_params == sum(p.numel() for p in trainable.values()) == LORA_R16_ALL_LINEAR
    assert info.total_params == BASE_PARAMS + LORA_R16_ALL_LINEAR
    assert info.describe().startswith("trainable 4,884,480 / total 139,399,488 (3.5%)")
    # peft's "all-linear" leaves the output layer alone; it stays tied to the embedding.
    lm_head = model.get_output_embeddings()
    assert type(lm_head) is torch.nn.Linear
    assert not any("lm_head" in n for n in _lora_params(model))
    assert lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    # every Linear4bit got LoRA and has its CPU repacking disabled
    layers = _linear4bit(model)
    assert len(layers) == 7 * N_LAYERS
    assert all(not getattr(m, "support_avx512bf16_for_cpu", False) for m in layers)
    assert len([n for n in trainable if "lora_A" in n]) == len(layers)


@pytest.mark.integration
def test_dtypes_after_prepare_model_for_kbit_training(lora_model):
    model, _, info = lora_model
    assert info.device == torch.device("cpu") and info.quant == "nf4"
    assert info.compute_dtype == M.resolve_compute_dtype("auto", torch.device("cpu"))
    dtypes = {p.dtype for n, p in model.named_parameters() if "lora_" not in n and p.dtype != torch.uint8}
    assert dtypes == {info.compute_dtype}  # embedding and norms: the residual stream runs in the compute dtype
    assert {p.dtype for p in _lora_params(model).values()} == {torch.float32}
    assert all(m.compute_dtype == info.compute_dtype for m in _linear4bit(model))
    # no tensor is left pointing into the memory-mapped checkpoint
    assert all(p.untyped_storage().resizable() for p in model.parameters())


@pytest.mark.integration
def test_quant_none_trains_lora_only(embedded_dir):
    cfg = OrpoConfig(
        device="cpu", quant="none", compute_dtype="float32", lora_r=4, lora_targets="q_proj,v_proj"
    )
    model, tokenizer, info = M.load_model_for_training(cfg)
    assert info.trainable_params == N_LAYERS * 4 * ((576 + 576) + (576 + 192))
    assert info.total_params == BASE_PARAMS + info.trainable_params
    assert "unquantised base, float32 compute on cpu; gradient checkpointing " in info.describe()
    _, grads = _lora_grads(model, _batch(tokenizer))
    assert all(g.any() for n, g in grads.items() if "lora_B" in n)


# --------------------------------------------------------------------------------------------
# (4) paths, errors, devices
# --------------------------------------------------------------------------------------------


def test_missing_model_path_names_it(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelError, match="no such directory") as err:
        M.resolve_model_path(str(missing))
    assert str(missing) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ModelError, match="no such directory"):
        M.resolve_model_path("./relative/missing")


def test_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelError, match="no config.json") as err:
        M.resolve_model_path(str(tmp_path))
    assert str(tmp_path) in str(err.value)
    with pytest.raises(ModelError, match="is a file"):
        M.resolve_model_path(str(tmp_path / "notes.txt"))


def test_directory_that_is_not_a_causal_lm(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ModelError, match="not a causal language model"):
        M.resolve_model_path(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelError, match="no model weights"):
        M.resolve_model_path(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="unreadable"):
        M.resolve_model_path(str(tmp_path))


def test_uncached_hub_id_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="not a local directory") as err:
        M.resolve_model_path("qlora-orpo-tests/no-such-model")
    assert "qlora-orpo-tests/no-such-model" in str(err.value)


@pytest.mark.integration
def test_local_model_dir_resolves_to_itself(embedded_dir):
    assert M.resolve_model_path(str(embedded_dir)) == str(embedded_dir)
    assert M.resolve_model_path("embedded") == str(embedded_dir)


@pytest.mark.integration
def test_tokenizer_without_eos_is_rejected_and_pad_defaults_to_eos(embedded_dir, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(embedded_dir / name, tmp_path)
    config_file = tmp_path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("pad_token", None)
    config_file.write_text(json.dumps(config))
    tokenizer = M.load_tokenizer(tmp_path)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    config.pop("eos_token")
    config_file.write_text(json.dumps(config))
    with pytest.raises(ModelError, match="no EOS token"):
        M.load_tokenizer(tmp_path)


def test_missing_tokenizer_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="tokenizer"):
        M.load_tokenizer(tmp_path)


def test_select_device():
    assert M.select_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert M.select_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            M.select_device("cuda:0")
    with pytest.raises(ConfigError):
        M.select_device("tpu")


def test_resolve_compute_dtype():
    cpu = torch.device("cpu")
    assert M.resolve_compute_dtype("float32", cpu) == torch.float32
    assert M.resolve_compute_dtype("bfloat16", cpu) == torch.bfloat16
    assert M.resolve_compute_dtype("float16", cpu) == torch.float16
    assert M.resolve_compute_dtype("auto", cpu) in (torch.bfloat16, torch.float32)
    with pytest.raises(ConfigError):
        M.resolve_compute_dtype("int8", cpu)


@pytest.mark.parametrize("capability, expected", [((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_auto_dtype_on_cuda_counts_only_native_bf16(monkeypatch, capability, expected):
    # A T4 (7.5) reports is_bf16_supported() == True through emulation; it gets float16.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    cuda = torch.device("cuda")
    assert M.resolve_compute_dtype("auto", cuda) == expected


def test_model_module_imports_without_loading_heavy_libraries():
    import subprocess
    import sys

    code = (
        "import sys, qlora_orpo.models.loader; print(sorted(m for m in ('peft', 'bitsandbytes') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=os.environ
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
