"""models/rank0_load.py in one process: rank 0's manifest and quant-state buffer rebuild its 4-bit modules."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny_llama
from transformers import AutoConfig

from qlora_orpo.models.loader import load_base
from qlora_orpo.models.rank0_load import build_4bit_skeleton, describe_4bit_layers


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("rank0") / "tiny"
    build_tiny_llama(vocab_size=64).save_pretrained(directory)
    return directory


def test_the_skeleton_has_rank_0_s_modules_shapes_and_quant_states_and_no_weights(tiny_dir):
    import bitsandbytes as bnb

    loaded = load_base(str(tiny_dir), "nf4", "cpu", torch.float32, quant_storage=torch.float32)
    manifest, buffer = describe_4bit_layers(loaded)
    manifest = json.loads(json.dumps(manifest))  # what crosses the wire is JSON
    assert len(manifest["layers"]) == 2 * 7 and buffer.dtype == torch.uint8 and buffer.numel() == manifest["bytes"]
    skeleton = build_4bit_skeleton(AutoConfig.from_pretrained(tiny_dir), manifest, buffer, torch.float32, torch.float32)

    want = {n: (tuple(p.shape), p.dtype) for n, p in loaded.named_parameters()}
    got = {n: (tuple(p.shape), p.dtype) for n, p in skeleton.named_parameters()}
    assert got == want
    assert all(p.is_meta for p in skeleton.parameters())  # this rank read no weights
    assert not any(p.requires_grad for p in skeleton.parameters()) and not skeleton.training
    layers = {n: m for n, m in loaded.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    rebuilt = {n: m for n, m in skeleton.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert rebuilt.keys() == layers.keys()
    for name, layer in layers.items():
        ours, theirs = rebuilt[name].quant_state, layer.weight.quant_state
        assert rebuilt[name].weight.quant_state is ours
        assert torch.equal(ours.absmax, theirs.absmax) and torch.equal(ours.code, theirs.code), name
        assert torch.equal(ours.state2.absmax, theirs.state2.absmax) and torch.equal(ours.offset, theirs.offset)
        assert (ours.shape, ours.dtype, ours.blocksize, ours.quant_type) == (
            theirs.shape, theirs.dtype, theirs.blocksize, theirs.quant_type)
        assert rebuilt[name].support_avx512bf16_for_cpu is False  # the repacking work-around applies


def test_a_manifest_of_another_version_is_refused(tiny_dir):
    loaded = load_base(str(tiny_dir), "nf4", "cpu", torch.float32)
    manifest, buffer = describe_4bit_layers(loaded)
    with pytest.raises(ValueError, match="version"):
        build_4bit_skeleton(AutoConfig.from_pretrained(tiny_dir), {**manifest, "version": 99}, buffer,
                            torch.float32, torch.float32)
