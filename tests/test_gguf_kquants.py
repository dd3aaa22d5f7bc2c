"""Tests of the K-quants (export/gguf_kquants.py), the named mixes (export/gguf_mix.py) and their exports.

* Bytes: a fixed input's Q4_K/Q5_K/Q6_K bytes hash to what llama.cpp's reference quantisers wrote
  for it, and, where llama-cpp-python is installed, a whole model quantised by
  ``llama_model_quantize`` has our types and bytes tensor for tensor.
* Round trips through the ``gguf`` package's dequantisers, with error bounds per type, on random
  and adversarial blocks (zeros, one outlier, constant rows, negative-only, tiny magnitudes).
* The mix: the table llama.cpp's ``llama_tensor_get_type`` gives for made-up 8- and 32-layer
  models, written out below from a reading of ``src/llama-quant.cpp``, and its fallbacks.
* End to end: a 256-wide random Llama (rows a multiple of 256, so the K-quants are really used)
  exported with ``--quant q4_k_m`` and the other new mixes, each verified by the exporter.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import build_tiny_llama, build_tokenizer
from test_gguf_export import IDS, build_qwen2_tokenizer, build_tiny_qwen2, make_case, max_diff, read_gguf

from qlora_orpo.config import GGUF_QUANTS, OrpoConfig
from qlora_orpo.export import gguf as G
from qlora_orpo.export import gguf_kquants as K
from qlora_orpo.export import gguf_mix as M
from qlora_orpo.export import gguf_verify as GV

T = gguf.GGMLQuantizationType
K_TYPES = {T.Q4_K: (32, 15), T.Q5_K: (32, 31), T.Q6_K: (16, 63)}  # group size, levels - 1


def golden_input() -> np.ndarray:
    """``(16, 512)`` float32, the same bits on every machine: integer hashing, then exact float32 steps.

    Rows 3, 5, 6, 9 and 11 are adversarial: zeros, a constant, negative-only, one outlier, tiny values.
    """
    i = np.arange(16 * 512, dtype=np.uint64)
    h = (i * np.uint64(2654435761) + np.uint64(12345)) % np.uint64(2**32)
    h ^= h >> np.uint64(15)
    h = (h * np.uint64(2246822519)) % np.uint64(2**32)
    u = (h.astype(np.float64) / 2**32 - 0.5).astype(np.float32).reshape(16, 512)
    x = u * u * u * np.float32(0.4) + u * np.float32(0.02)  # heavier tails than uniform
    x[3] = 0
    x[5] = np.float32(0.37)
    x[6] = -np.abs(x[6])
    x[9, 100] = np.float32(25.0)
    x[11] *= np.float32(1e-7)
    return x


# sha256 of the bytes llama.cpp's quantize_row_q{4,5,6}_K_ref (ggml/src/ggml-quants.c) wrote for
# golden_input(): a transcription of those functions compiled with gcc -O2 on x86-64 and called
# through ctypes (kept outside the repository; it agreed byte for byte with this module on 13
# random and adversarial inputs as well).
GOLDEN = {
    "Q4_K": "e34ca841f87e03e8b7e23d0a00c2155a456053240eea9187afb1156e1ca23749",
    "Q5_K": "17b87df22b50a48f99ce2b83aef3806d0c4c135ffbb44f8e207385ab2064d4a2",
    "Q6_K": "77fe34d1a241cf0b2fc29b4b19b947af5730dc02a18109cfede0d3eafeb37baf",
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_bytes_match_llama_cpp_reference_quantisers(name):
    data = K.quantize(golden_input(), T[name])
    block, size = gguf.GGML_QUANT_SIZES[T[name]]
    assert data.dtype == np.uint8 and data.shape == (16, 512 // block * size)
    assert hashlib.sha256(data.tobytes()).hexdigest() == GOLDEN[name]


def round_trip(x: np.ndarray, qtype) -> np.ndarray:
    data = K.quantize(x, qtype)
    assert data.dtype == np.uint8 and data.shape == (*x.shape[:-1], x.shape[-1] // 256 * gguf.GGML_QUANT_SIZES[qtype][1])
    back = gguf.quants.dequantize(data, qtype)
    assert back.shape == x.shape and np.isfinite(back).all()
    return back


def group_error_ratio(x: np.ndarray, back: np.ndarray, qtype) -> float:
    """Largest error in a group over that group's code step (its range over the number of steps)."""
    group, steps = K_TYPES[qtype]
    xs, err = x.reshape(-1, group), np.abs(back - x).reshape(-1, group)
    if qtype == T.Q6_K:  # symmetric: codes span [-max|x|, max|x|]
        span = 2 * np.abs(xs).max(axis=1)
    else:  # codes span [min(x, 0), max(x)]
        span = xs.max(axis=1) - np.minimum(xs.min(axis=1), 0)
    return float((err.max(axis=1) / (span / steps)).max())


# Measured on these seeded inputs (rms relative error 0.0715, 0.0363, 0.0178; group ratio 0.84,
# 1.11, 0.64 on normal weights); a mis-packed nibble or scale is off by a whole range instead.
RMS_BOUND = {T.Q4_K: 0.08, T.Q5_K: 0.04, T.Q6_K: 0.02}
GROUP_BOUND = 1.5


@pytest.mark.parametrize("qtype", list(K_TYPES), ids=lambda t: t.name)
def test_round_trip_error_on_random_blocks(qtype):
    rng = np.random.default_rng(0)
    for x in (rng.standard_normal((64, 1024)).astype(np.float32) * 0.02,
              rng.uniform(-1, 1, (16, 1024)).astype(np.float32),
              -np.abs(rng.standard_normal((16, 512))).astype(np.float32)):  # negative only
        back = round_trip(x, qtype)
        assert group_error_ratio(x, back, qtype) <= GROUP_BOUND
    normal = rng.standard_normal((64, 1024)).astype(np.float32)
    back = round_trip(normal, qtype)
    assert np.sqrt(np.mean((back - normal) ** 2)) <= RMS_BOUND[qtype]


@pytest.mark.parametrize("qtype", list(K_TYPES), ids=lambda t: t.name)
def test_round_trip_on_adversarial_blocks(qtype):
    group, steps = K_TYPES[qtype]
    zeros = np.zeros((2, 512), np.float32)
    assert not K.quantize(zeros, qtype).any() and not round_trip(zeros, qtype).any()  # all-zero bytes, exact zeros
    for value in (0.37, -0.37, 1e4):  # constant rows: only the float16 scale rounds
        const = np.full((2, 512), value, np.float32)
        assert np.abs(round_trip(const, qtype) - const).max() <= 2e-3 * abs(value)
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((4, 512)) * 0.01).astype(np.float32)
    x[1, 300] = 10.0  # one outlier in the second super-block of row 1
    back = round_trip(x, qtype)
    assert abs(back[1, 300] - 10.0) <= 10.0 / steps  # the outlier survives
    untouched = np.ones_like(x, dtype=bool)
    untouched[1, 256:] = False  # other super-blocks keep their own scales: ordinary errors there
    assert group_error_ratio(x[untouched].reshape(-1, 256), back[untouched].reshape(-1, 256), qtype) <= GROUP_BOUND
    # its neighbours lose precision (6-bit scales relative to the outlier's), never more than their own size
    assert np.abs(back[1, 256:] - x[1, 256:]).max() <= 10.0 / steps + 2 * np.abs(x[1, 256:300]).max()
    # Tiny weights: d and dmin underflow to float16 subnormals (step 2**-24, times up to 63 for a
    # 6-bit min), as in llama.cpp (the golden row 11 pins those bytes); finite, and no worse than that.
    tiny = (rng.standard_normal((2, 512)) * 1e-6).astype(np.float32)
    assert np.abs(round_trip(tiny, qtype) - tiny).max() <= 2 * np.abs(tiny).max() + 64 * 2.0**-24


def test_quantize_refuses_rows_the_blocks_do_not_divide_and_delegates_other_types():
    with pytest.raises(ValueError, match="not a multiple of 256"):
        K.quantize(np.zeros((2, 320), np.float32), T.Q4_K)
    x = np.random.default_rng(2).standard_normal((3, 64)).astype(np.float32)
    assert np.array_equal(K.quantize(x, T.Q5_0), gguf.quants.quantize(x, T.Q5_0))


def test_nearest_int_rounds_half_to_even_like_ggml():
    v = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 3.49, -3.51, 1e6], np.float32)
    assert K.nearest_int(v).tolist() == [0, 2, 2, 0, -2, 3, -4, 1000000]
    assert K.nearest_int(np.array([np.nan], np.float32)).tolist() == [0]  # as the C bit trick gives


# --------------------------------------------------------------------------------------------
# the mixes
# --------------------------------------------------------------------------------------------

HIDDEN, FFN, KV = 4096, 14336, 1024  # Llama-3-8B-like shapes: every row a multiple of 256
SHAPES = {"attn_q": (HIDDEN, HIDDEN), "attn_k": (KV, HIDDEN), "attn_v": (KV, HIDDEN), "attn_output": (HIDDEN, HIDDEN),
          "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN), "ffn_down": (HIDDEN, FFN)}
# use_more_bits(i, n): i < n/8, i >= 7n/8, or (i - n/8) % 3 == 2, read from llama-quant.cpp
MORE_BITS = {8: {0, 3, 6, 7}, 32: {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}}
# quant -> (default, output, token_embd untied, token_embd tied, attn_v/ffn_down in MORE_BITS layers)
EXPECTED = {
    "q4_k_m": ("Q4_K", "Q6_K", "Q4_K", "Q6_K", "Q6_K"),
    "q5_k_m": ("Q5_K", "Q6_K", "Q5_K", "Q6_K", "Q6_K"),
    "q6_k": ("Q6_K", "Q6_K", "Q6_K", "Q6_K", "Q6_K"),
    "q5_0": ("Q5_0", "Q6_K", "Q5_0", "Q6_K", "Q5_0"),
    "q4_0": ("Q4_0", "Q6_K", "Q4_0", "Q6_K", "Q4_0"),
    "q8_0": ("Q8_0", "Q8_0", "Q8_0", "Q8_0", "Q8_0"),
}


@pytest.mark.parametrize("n_layer", [8, 32])
@pytest.mark.parametrize("quant", list(EXPECTED))
def test_mix_picks_llama_cpp_types(quant, n_layer):
    default, output, embd, embd_tied, more = EXPECTED[quant]
    for tied in (False, True):
        def pick(name, shape, tied=tied):
            return M.tensor_type(name, shape, quant, n_layer, tied=tied).name

        assert pick("token_embd.weight", (128256, HIDDEN)) == (embd_tied if tied else embd)
        assert pick("output.weight", (128256, HIDDEN)) == output
        assert pick("output_norm.weight", (HIDDEN,)) == "F32"
        for i in range(n_layer):
            assert pick(f"blk.{i}.attn_norm.weight", (HIDDEN,)) == "F32"
            for kind, shape in SHAPES.items():
                bumped = kind in ("attn_v", "ffn_down") and i in MORE_BITS[n_layer]
                assert pick(f"blk.{i}.{kind}.weight", shape) == (more if bumped else default), (kind, i)
    assert [M.use_more_bits(i, n_layer) for i in range(n_layer)] == [i in MORE_BITS[n_layer] for i in range(n_layer)]


def test_mix_fallbacks_for_rows_the_blocks_do_not_divide():
    pick = lambda name, shape, quant, **kw: M.tensor_type(name, shape, quant, 30, **kw).name  # noqa: E731
    # SmolLM2-135M: hidden 576 = 2.25 * 256
    assert pick("blk.5.attn_q.weight", (576, 576), "q4_k_m") == "Q5_0"  # Q4_K -> Q5_0
    assert pick("blk.5.attn_q.weight", (576, 576), "q5_k_m") == "Q5_1"  # Q5_K -> Q5_1
    assert pick("blk.5.attn_q.weight", (576, 576), "q6_k") == "Q8_0"  # Q6_K -> Q8_0
    assert pick("blk.0.attn_v.weight", (192, 576), "q4_k_m") == "Q8_0"  # the Q6_K bump falls back too
    assert pick("blk.4.ffn_down.weight", (576, 1536), "q4_k_m") == "Q4_K"  # 1536 = 6 * 256 fits (layer 5 of 30 is bumped)
    assert pick("token_embd.weight", (49152, 576), "q4_k_m", tied=True) == "Q8_0"  # output rule: not / 256
    assert pick("output.weight", (49152, 1024), "q4_0") == "Q6_K"  # the output rule asks for Q6_K ...
    assert pick("output.weight", (49152, 576), "q4_0") == "Q8_0"  # ... then Q6_K's fallback, as 256 does not
    for quant in ("q4_k_m", "q5_k_m", "q6_k", "q4_0", "q5_0", "q8_0"):
        assert pick("blk.5.attn_q.weight", (48, 48), quant) == "F16"  # not even 32 fits
    assert pick("blk.4.attn_v.weight", (1024, 8192), "q4_k_m", llm_type_70b=True) == "Q5_K"  # 70B bump
    assert pick("blk.5.attn_q.weight", (8192, 8192), "q4_k_m", llm_type_70b=True) == "Q4_K"
    assert M.is_70b("llama", 80, 64, 8) and not M.is_70b("llama", 80, 64, 64) and not M.is_70b("llama", 32, 32, 8)
    with pytest.raises(ValueError, match="quant: 'q3_k_m' is not one of"):
        M.tensor_type("output.weight", (8, 256), "q3_k_m", 2)


def test_file_types_and_quant_choices_agree_everywhere():
    from qlora_orpo.cli.export import build_parser

    assert GV.QUANTS == GGUF_QUANTS and set(G.FILE_TYPES) == set(GGUF_QUANTS)
    for quant in M.MIXES:
        assert G.FILE_TYPES[quant] == M.file_type(quant)
    assert G.FILE_TYPES["q4_k_m"] == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert OrpoConfig(export="gguf", gguf_quant="q4_k_m").gguf_quant == "q4_k_m"
    quant_flag = next(a for a in build_parser()._actions if a.dest == "quant")
    assert tuple(quant_flag.choices) == GGUF_QUANTS
    scale = 20.0
    bounds = [GV.gguf_tolerance(q, scale) for q in ("q8_0", "q6_k", "q4_k_m")]
    assert bounds == sorted(bounds) and GV.gguf_tolerance("q5_0", scale) < GV.gguf_tolerance("q4_0", scale)
    # q5_k_m is the exception, by measurement: its Q5_1 fallbacks read back worse than q4_k_m's
    # (gguf_tolerance's docstring), so its bound is the widest of the mixes.
    assert GV.gguf_tolerance("q5_k_m", scale) > GV.gguf_tolerance("q4_k_m", scale)


# --------------------------------------------------------------------------------------------
# end to end
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A random 8-layer Llama, 256 wide (MLP 512, untied), with a non-identity adapter."""
    return make_case(tmp_path_factory.mktemp("wide"), build_tiny_llama(hidden=256, layers=8), build_tokenizer())


def gguf_types(path: str | Path) -> tuple[dict[str, str], int]:
    reader = gguf.GGUFReader(str(path))
    return {t.name: T(t.tensor_type).name for t in reader.tensors}, int(reader.fields["general.file_type"].contents())


def test_cli_q4_k_m_export_verifies_and_uses_the_mix(wide, tmp_path, capsys):
    from qlora_orpo.cli.export import main as export_main

    out = tmp_path / "wide.gguf"
    rc = export_main(["--adapter", str(wide["adapter"]), "--out", str(out), "--format", "gguf", "--quant", "q4_k_m"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    check = json.loads(captured.out)["check"]
    assert check["max_abs_diff"] <= check["tolerance"] and check["top1_agreement"] > 0.4
    model, _ = read_gguf(str(out))  # independently of the exporter: the adapter is in there
    with torch.no_grad():
        logits = [model(torch.tensor([ids])).logits[0] for ids in IDS]
    assert max_diff(logits, wide["reference"]) < 0.5 * max_diff(logits, wide["plain"])
    types, file_type = gguf_types(out)
    assert file_type == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert types["token_embd.weight"] == "Q4_K" and types["output.weight"] == "Q6_K"
    for i in range(8):
        bumped = "Q6_K" if i in MORE_BITS[8] else "Q4_K"
        assert types[f"blk.{i}.attn_v.weight"] == bumped and types[f"blk.{i}.ffn_down.weight"] == bumped
        assert types[f"blk.{i}.attn_q.weight"] == "Q4_K" and types[f"blk.{i}.attn_norm.weight"] == "F32"


@pytest.mark.parametrize("quant", ["q6_k", "q5_k_m", "q5_0", "q4_0"])
def test_other_mixes_export_and_verify(wide, quant):
    result = G.export_gguf(wide["adapter"], wide["root"] / quant, quant)
    assert result.check.max_abs_diff <= result.check.tolerance
    types, file_type = gguf_types(result.path)
    assert file_type == G.FILE_TYPES[quant]
    assert types["blk.1.attn_q.weight"] == M.MIXES[quant][0] and types["output.weight"] == "Q6_K"


def test_fallback_heavy_qwen2_q4_k_m_verifies(tmp_path):
    """64-wide rows: every Q4_K falls back to Q5_0, the output to Q8_0; q/k/v biases stay F32."""
    case = make_case(tmp_path, build_tiny_qwen2(), build_qwen2_tokenizer())
    result = G.export_gguf(case["adapter"], tmp_path / "q.gguf", "q4_k_m")
    assert result.check.max_abs_diff <= result.check.tolerance
    types, _ = gguf_types(result.path)
    assert types["blk.0.attn_q.weight"] == "Q5_0" and types["output.weight"] == "Q8_0"
    assert types["blk.1.ffn_down.weight"] == "Q8_0" and types["blk.0.attn_q.bias"] == "F32"


@pytest.mark.parametrize("family", ["llama-256-tied", "qwen2-64"])
def test_bytes_and_types_match_llama_cpp_quantize(family, tmp_path):
    """Every mix of an F32 GGUF against llama.cpp's ``llama_model_quantize`` of the same file, tensor for tensor.

    The tied 256-wide Llama exercises the K-quants, the Q6_K bumps and the tied-embedding rule; the
    64-wide Qwen2 (untied, biases) the fallbacks (Q5_0, Q5_1, Q8_0).
    """
    import ctypes

    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: no byte comparison "
                                    "with llama.cpp (the golden hashes above still pin the reference bytes)")
    from qlora_orpo.export.gguf_vocab import build_vocab

    if family == "qwen2-64":
        model, tokenizer, arch = build_tiny_qwen2(), build_qwen2_tokenizer(), "qwen2"
    else:
        model, tokenizer, arch = build_tiny_llama(hidden=256, layers=8, tie=True), build_tokenizer(), "llama"
    f32 = tmp_path / "f32.gguf"
    G.write_gguf(f32, model, build_vocab(tokenizer, model.config.vocab_size), arch, "f32", "t", "none")
    source = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(f32)).tensors}
    tied = "output.weight" not in source
    assert tied == (family == "llama-256-tied")
    for quant in M.MIXES:
        out = tmp_path / f"{quant}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = G.FILE_TYPES[quant], 1
        assert llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), ctypes.byref(params)) == 0
        theirs = gguf.GGUFReader(str(out))
        assert int(theirs.fields["general.file_type"].contents()) == G.FILE_TYPES[quant]
        compared = set()
        for tensor in theirs.tensors:
            data = source[tensor.name]
            ours = M.tensor_type(tensor.name, data.shape, quant, model.config.num_hidden_layers, tied=tied)
            assert T(tensor.tensor_type) == ours, (quant, tensor.name)
            mine = K.quantize(data, ours).reshape(-1).view(np.uint8) if ours != T.F32 else data.view(np.uint8).reshape(-1)
            assert np.array_equal(mine, np.array(tensor.data).view(np.uint8).reshape(-1)), (quant, tensor.name)
            compared.add(ours.name)
        assert len(theirs.tensors) == len(source) and compared - {"F32"}, (quant, compared)
