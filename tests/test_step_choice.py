"""``--step auto``: shared when its rows fit the budget, else sequential when both sides fit, else split; same gradient."""

from __future__ import annotations

import torch
from test_step import assert_grads_close, random_pairs, run_step, tiny_lora_model

from qlora_orpo.data.collate import collate_pairs
from qlora_orpo.models.floor import ModelShape
from qlora_orpo.training.step import OrpoStep
from qlora_orpo.training.step_choice import StepChooser, available_memory_bytes

SMOLLM2 = ModelShape(hidden=576, layers=30, heads=9, kv_heads=3, head_dim=64, intermediate=1536, vocab=49152,
                     tied_embeddings=True)


def chooser(budget_mib: float, shared: bool = False) -> StepChooser:
    return StepChooser(SMOLLM2, int(budget_mib * 2**20), lora_r=16, lora_targets="all-linear", chunk_size=64,
                       activation_bytes=4, shared=shared)


def batch_of(length: int):
    from qlora_orpo.data.collate import TokenizedPair

    pair = TokenizedPair(tuple(range(3, 3 + length // 2)), tuple(range(3, 3 + length // 2)), (5, 6, 7), row=1)
    return collate_pairs([pair], pad_token_id=0)


def test_sequential_when_two_sides_fit_split_when_only_one_does():
    probe = chooser(0)
    one, two = probe.predicted_bytes(1024, 1), probe.predicted_bytes(1024, 2)
    assert one < two
    between = (one + two) / 2 / 2**20
    assert chooser(between)(batch_of(1024)) == "split"
    assert chooser(two / 2**20 + 1)(batch_of(1024)) == "sequential"
    # The same budget takes a short batch sequentially and a long one split.
    mixed = chooser(chooser(0).predicted_bytes(512, 2) / 2**20 + 1)
    assert [mixed(batch_of(n)) for n in (512, 2048, 512)] == ["sequential", "split", "sequential"]
    assert mixed.counts == {"shared": 0, "sequential": 2, "split": 1}
    assert "sequential 2, split 1" in mixed.describe()


def test_available_memory_is_positive_on_this_machine():
    assert available_memory_bytes(torch.device("cpu")) > 0


def test_auto_step_gives_the_joint_gradient_in_either_mode():
    model = tiny_lora_model()
    batch = collate_pairs(random_pairs(3), pad_token_id=0)
    _, joint = run_step(model, batch, "joint")
    for decision in ("sequential", "split"):
        picked = []

        def choose(b, decision=decision, picked=picked):
            picked.append(decision)
            return decision

        model.zero_grad(set_to_none=True)
        torch.manual_seed(123)
        OrpoStep(model, beta=0.5, mode="auto", chunk_size=5, choose=choose)(batch, loss_scale=0.5)
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        assert picked == [decision]
        assert_grads_close(grads, joint)


def test_shared_when_its_rows_fit_and_the_two_sequence_modes_otherwise():
    # 1024 prompt tokens, replies of 1024 and 3: shared holds 2051 tokens in one row, sequential 2 x 2048.
    batch = batch_of(2048)
    shared_bytes = chooser(0).predicted_bytes(1024 + 1024 + 3, 1)
    two_sides = chooser(0).predicted_bytes(2048, 2)
    assert shared_bytes < two_sides
    assert chooser(shared_bytes / 2**20 + 1, shared=True)(batch) == "shared"
    assert chooser(shared_bytes / 2**20 - 1, shared=True)(batch) == "split"
    assert chooser(two_sides / 2**20 + 1, shared=False)(batch) == "sequential"
    no_pairs = collate_pairs(random_pairs(1), pad_token_id=0)
    no_pairs.pairs = ()  # a batch built without its pairs cannot be laid out shared
    assert chooser(10_000, shared=True)(no_pairs) == "sequential"


def test_an_out_of_memory_pass_is_retried_leaner_with_nothing_left_behind_and_remembered(monkeypatch):
    """A shared pass that runs out of memory halfway through its backward (after some LoRA
    gradients were written) is retried as sequential; the accumulated gradient is exactly the
    one of a run that never failed, and later micro-batches are never laid out shared again."""
    model = tiny_lora_model()
    first, second = random_pairs(2, seed=3), random_pairs(2, seed=4)
    pick = chooser(100_000, shared=True)
    assert pick(collate_pairs(first, 0)) == "shared"
    pick.counts["shared"] = 0

    def grads_of(step, batches):
        model.zero_grad(set_to_none=True)
        for b in batches:
            step(collate_pairs(b, 0), loss_scale=0.5)
        return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    backwards, failures = [], []

    def backward(loss):
        backwards.append(True)
        loss.backward()  # gradients written...
        if len(backwards) == 2:  # ...then the device "runs out": the second micro-batch's shared pass
            failures.append(True)
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    step = OrpoStep(model, beta=0.5, mode="auto", chunk_size=5, choose=pick, backward=backward)
    third = random_pairs(2, seed=5)
    got = grads_of(step, [first, second, third])
    want = grads_of(OrpoStep(model, beta=0.5, mode="sequential", chunk_size=5), [first, second, third])
    assert failures and pick.retries == [("shared", "sequential")] and pick.ceiling == "sequential"
    assert pick.counts == {"shared": 1, "sequential": 2, "split": 0}  # the third chose leaner at once
    assert "1 out-of-memory retry (shared->sequential), at most sequential since" in pick.describe()
    assert_grads_close(got, want)


def test_shared_only_where_it_saves_tokens():
    """A short prompt with long replies: the shared row holds ~all of both sides' tokens and costs
    more attention, so auto keeps sequential however large the budget (docs/benchmarks.md, 2048)."""
    from qlora_orpo.data.collate import TokenizedPair

    short_prompt = TokenizedPair((3, 4), tuple(range(5, 1005)), tuple(range(5, 1005)), row=1)
    long_prompt = TokenizedPair(tuple(range(3, 803)), tuple(range(5, 205)), tuple(range(5, 205)), row=2)
    assert chooser(100_000, shared=True)(collate_pairs([short_prompt], pad_token_id=0)) == "sequential"
    assert chooser(100_000, shared=True)(collate_pairs([long_prompt], pad_token_id=0)) == "shared"
