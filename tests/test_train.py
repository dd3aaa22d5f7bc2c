"""The loop on a tiny model saved to disk: it learns, logs, checkpoints, resumes exactly, fails loudly."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny_llama, build_tokenizer

from qlora_orpo.config import OrpoConfig
from qlora_orpo.core.errors import TrainingError
from qlora_orpo.recipes.finetune import run
from qlora_orpo.training.checkpoint import latest_checkpoint
from qlora_orpo.training.metrics import read_metrics
from qlora_orpo.training.optim import lr_lambda

WORDS = "the quick brown fox jumps over lazy dog hello world capital France Paris bread flour water".split()


@pytest.fixture
def tiny_model_dir(tmp_path):
    tokenizer = build_tokenizer(chat_template=True)
    model = build_tiny_llama(vocab_size=len(tokenizer))
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    path = tmp_path / "tiny-model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def tiny_data(tmp_path):
    rng = torch.Generator().manual_seed(0)
    path = tmp_path / "pairs.jsonl"
    with open(path, "w") as handle:
        for _ in range(40):
            words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (8,), generator=rng)]
            handle.write(json.dumps({
                "prompt": " ".join(words[:3]),
                "chosen": "hello world " + " ".join(words[3:6]),  # a learnable preference
                "rejected": "the lazy dog " + " ".join(words[5:8]),
            }) + "\n")
    return path


def tiny_config(tmp_path, model_dir, data, **overrides) -> OrpoConfig:
    values = dict(
        model=str(model_dir), data=str(data), output_dir=str(tmp_path / "runs"), run_name="t",
        quant="none", compute_dtype="float32", device="cpu", max_steps=6, batch_size=2, grad_accum=2,
        max_length=64, max_prompt_length=32, lora_r=4, lora_alpha=8, lora_dropout=0.0,
        learning_rate=5e-3, eval_fraction=0.2, eval_max_pairs=8, save_every=2, logits_chunk_size=16,
    )
    values.update(overrides)
    return OrpoConfig(**values)


def train_losses(run_dir):
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]


def test_training_logs_checkpoints_and_improves_reward_accuracy(tmp_path, tiny_model_dir, tiny_data):
    cfg = tiny_config(tmp_path, tiny_model_dir, tiny_data, max_steps=12, lora_dropout=0.05)
    summary = run(cfg)
    run_dir = tmp_path / "runs" / "t"
    assert OrpoConfig.from_file(run_dir / "config.yaml") == cfg  # the resolved config is recorded
    records = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 13))
    for key in ("loss", "nll", "or_loss", "reward_accuracy", "reward_margin", "lr", "tokens_per_s", "grad_norm"):
        assert all(key in r for r in train), key
    assert {r["tag"] for r in records if r["split"] == "eval"} == {"before", "after"}
    assert summary["eval_after"]["reward_margin"] > summary["eval_before"]["reward_margin"]
    assert train[-1]["loss"] < train[0]["loss"]
    assert latest_checkpoint(run_dir).name == "step-000012"
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert not list(run_dir.rglob("*.bin")) and not list(run_dir.rglob("*.pt"))  # no pickle anywhere


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path, tiny_model_dir, tiny_data):
    full_cfg = tiny_config(tmp_path, tiny_model_dir, tiny_data, run_name="full", lora_dropout=0.1, save_every=0)
    run(full_cfg)

    def interrupt(step):
        if step == 3:
            raise KeyboardInterrupt

    cut_cfg = tiny_config(tmp_path, tiny_model_dir, tiny_data, run_name="cut", lora_dropout=0.1, save_every=0)
    with pytest.raises(KeyboardInterrupt):
        run(cut_cfg, on_step_end=interrupt)
    assert latest_checkpoint(tmp_path / "runs" / "cut").name == "step-000003"  # Ctrl-C saved one
    run(cut_cfg, resume=True)
    full, resumed = train_losses(tmp_path / "runs" / "full"), train_losses(tmp_path / "runs" / "cut")
    assert [s for s, _ in resumed] == list(range(1, 7))
    for (step, a), (_, b) in zip(full, resumed, strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6), f"step {step}"


def poison_micro_batch(monkeypatch, call: int, poison) -> None:
    """Run ``poison(step, out)`` after the ``call``-th micro-batch (1-based) of the training step."""
    import qlora_orpo.training.step as step

    calls = {"n": 0}
    real = step.OrpoStep.__call__

    def poisoned(self, batch, loss_scale=1.0, **kw):
        out = real(self, batch, loss_scale, **kw)
        calls["n"] += 1
        if calls["n"] == call:
            poison(self, out)
        return out

    monkeypatch.setattr(step.OrpoStep, "__call__", poisoned)


def test_non_finite_loss_stops_with_step_and_rows(tmp_path, tiny_model_dir, tiny_data, monkeypatch):
    def nan_loss(step, out):
        out.loss = torch.tensor(float("nan"))

    poison_micro_batch(monkeypatch, 5, nan_loss)  # first micro-batch of step 3
    cfg = tiny_config(tmp_path, tiny_model_dir, tiny_data)
    with pytest.raises(TrainingError, match=r"non-finite loss .* at step 3, pair rows \[\d+, \d+\].*step-000002"):
        run(cfg)


def test_non_finite_gradient_stops_before_the_weights_change(tmp_path, tiny_model_dir, tiny_data, monkeypatch):
    """A finite loss whose gradient is NaN (as a bad rejected pass in the split step gives) stops the run."""
    from safetensors.torch import load_file

    def nan_gradient(step, out):
        lora = next(p for n, p in step.model.named_parameters() if "lora_B" in n)
        lora.grad[0, 0] = float("nan")

    poison_micro_batch(monkeypatch, 6, nan_gradient)  # second micro-batch of step 3
    cfg = tiny_config(tmp_path, tiny_model_dir, tiny_data)
    with pytest.raises(TrainingError, match=r"non-finite gradient norm \(nan\) at step 3, pair rows \[\d+, \d+, \d+, \d+\].*"
                                            r"weights were not updated.*step-000002"):
        run(cfg)
    # The checkpoint of step 2 is the latest; nothing NaN was saved anywhere.
    run_dir = tmp_path / "runs" / "t"
    assert latest_checkpoint(run_dir).name == "step-000002"
    weights = load_file(str(latest_checkpoint(run_dir) / "adapter" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_8bit_optimizer_state_round_trips_through_safetensors_and_json(tmp_path):
    """bitsandbytes' 8-bit AdamW keeps a nested dict of quantised state; a checkpoint must hold it (no pickle)."""
    bnb = pytest.importorskip("bitsandbytes")
    from qlora_orpo.training.checkpoint import _flatten_optimizer, _unflatten_optimizer

    params = [torch.nn.Parameter(torch.randn(4096 + 7)), torch.nn.Parameter(torch.randn(64, 64)), torch.nn.Parameter(torch.randn(9))]
    optimizer = bnb.optim.AdamW8bit(params, lr=1e-3)
    # Its state is built on the CPU (only stepping needs CUDA).
    for gi, group in enumerate(optimizer.param_groups):
        for pi, p in enumerate(group["params"]):
            optimizer.init_state(group, p, gi, pi)
            optimizer.state[p]["step"] = 7
            for value in optimizer.state[p].values():
                if isinstance(value, torch.Tensor) and value.dtype == torch.uint8:
                    value.random_(0, 255)
    saved = optimizer.state_dict()
    assert any(isinstance(v, dict) for slots in saved["state"].values() for v in slots.values())
    tensors, meta = _flatten_optimizer(saved)
    from safetensors.torch import load_file, save_file

    save_file(tensors, str(tmp_path / "optimizer.safetensors"))
    meta = json.loads(json.dumps(meta))
    restored = _unflatten_optimizer(load_file(str(tmp_path / "optimizer.safetensors")), meta)
    fresh = bnb.optim.AdamW8bit([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-3)
    fresh.load_state_dict(restored)
    for before, after in zip(optimizer.param_groups[0]["params"], fresh.param_groups[0]["params"], strict=True):
        a, b = optimizer.state[before], fresh.state[after]
        assert a.keys() == b.keys()
        for name in a:
            if isinstance(a[name], torch.Tensor):
                assert torch.equal(a[name], b[name]), name
            else:
                assert a[name] == b[name], name


def test_existing_run_directory_is_not_overwritten(tmp_path, tiny_model_dir, tiny_data):
    cfg = tiny_config(tmp_path, tiny_model_dir, tiny_data, max_steps=2)
    run(cfg)
    with pytest.raises(Exception, match="already holds a run"):
        run(cfg)


def test_full_disk_during_checkpoint_keeps_the_previous_one(tmp_path, tiny_model_dir, tiny_data, monkeypatch):
    import qlora_orpo.training.checkpoint as checkpoint

    real = checkpoint.save_file
    writes = {"n": 0}

    def failing_save(tensors, filename, *args, **kwargs):
        writes["n"] += 1
        if "step-000004" in str(filename):
            raise OSError(28, "No space left on device")
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", failing_save)
    cfg = tiny_config(tmp_path, tiny_model_dir, tiny_data)
    with pytest.raises(TrainingError, match=r"step 4 \(No space left on device\); the last good checkpoint is .*step-000002"):
        run(cfg)
    run_dir = tmp_path / "runs" / "t"
    assert latest_checkpoint(run_dir).name == "step-000002"
    assert not list((run_dir / "checkpoints").glob("*.tmp"))


def test_lr_schedule_warms_up_then_decays():
    cfg = OrpoConfig(warmup_ratio=0.2, lr_scheduler="cosine")
    f = lr_lambda(cfg, total_steps=10)
    values = [f(s) for s in range(10)]
    assert values[0] < values[1] < values[2] == 1.0
    assert all(a >= b for a, b in zip(values[2:], values[3:], strict=False))
    assert values[-1] < 0.1


# ---------------------------------------------------------------------------------------------
# Resume that loses nothing (issue 12)
# ---------------------------------------------------------------------------------------------


def test_resume_with_more_steps_continues_the_same_losses(tmp_path, tiny_model_dir, tiny_data, capsys):
    # A constant schedule, so raising max_steps changes no learning rate of the first steps.
    common = dict(lora_dropout=0.1, save_every=0, lr_scheduler="constant", warmup_ratio=0.0)
    run(tiny_config(tmp_path, tiny_model_dir, tiny_data, run_name="long", max_steps=4, **common))
    short = tiny_config(tmp_path, tiny_model_dir, tiny_data, run_name="short", max_steps=2, **common)
    run(short)
    capsys.readouterr()
    run(short, resume=True, overrides={"max_steps": 4, "log_every": 2})
    assert "max_steps: 2 -> 4" in capsys.readouterr().err  # says what changed
    run_dir = tmp_path / "runs" / "short"
    assert OrpoConfig.from_file(run_dir / "config.yaml").max_steps == 4  # recorded
    long, resumed = dict(train_losses(tmp_path / "runs" / "long")), dict(train_losses(run_dir))
    assert sorted(resumed) == [1, 2, 4]  # steps 1-2 from the first run, then every 2nd step
    for step in resumed:
        assert resumed[step] == pytest.approx(long[step], rel=1e-5, abs=1e-6), f"step {step}"


def test_resume_refuses_a_change_that_alters_the_training(tmp_path, tiny_model_dir, tiny_data):
    from qlora_orpo.core.errors import ConfigError

    cfg = tiny_config(tmp_path, tiny_model_dir, tiny_data, max_steps=2, save_every=0)
    run(cfg)
    with pytest.raises(ConfigError, match=r"beta \(0\.1 in the run, 0\.5 given\)"):
        run(cfg, resume=True, overrides={"beta": 0.5, "max_steps": 3})


def test_ctrl_c_mid_accumulation_then_resume_equals_an_uninterrupted_run(tmp_path, tiny_model_dir, tiny_data,
                                                                          monkeypatch):
    from qlora_orpo.training.step import OrpoStep

    # lora_dropout > 0: the resumed run must also restore the RNG of the last completed step's end.
    common = dict(lora_dropout=0.1, save_every=2, grad_accum=3, max_steps=5)
    run(tiny_config(tmp_path, tiny_model_dir, tiny_data, run_name="full", **common))

    calls = {"n": 0}
    original = OrpoStep.__call__

    def interrupt_in_step_3(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2 * 3 + 2:  # the 2nd micro-batch of step 3: one micro-batch's gradient already added
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    cut = tiny_config(tmp_path, tiny_model_dir, tiny_data, run_name="cut", **common)
    monkeypatch.setattr(OrpoStep, "__call__", interrupt_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        run(cut)
    monkeypatch.setattr(OrpoStep, "__call__", original)
    run_dir = tmp_path / "runs" / "cut"
    checkpoint = latest_checkpoint(run_dir)
    assert checkpoint.name == "step-000002"  # the periodic save of step 2, replaced by the interrupt's
    assert not list((run_dir / "checkpoints").glob("*.old")) and not list((run_dir / "checkpoints").glob("*.tmp"))
    state = json.loads((checkpoint / "state.json").read_text())["train_state"]
    assert state["step"] == 2 and state["micro_batches"] == 2 * 3  # the unfinished step's micro-batch not counted
    run(cut, resume=True)
    full, resumed = train_losses(tmp_path / "runs" / "full"), train_losses(run_dir)
    assert [s for s, _ in resumed] == list(range(1, 6))
    for (step, a), (_, b) in zip(full, resumed, strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6), f"step {step}"


def test_resume_on_changed_data_is_refused_naming_the_file(tmp_path, tiny_model_dir, tiny_data):
    cfg = tiny_config(tmp_path, tiny_model_dir, tiny_data, max_steps=2, save_every=0)
    run(cfg)
    lines = tiny_data.read_text().splitlines()
    row = json.loads(lines[0])
    row["chosen"] = "a different reply"
    tiny_data.write_text("\n".join([json.dumps(row), *lines[1:]]) + "\n")
    with pytest.raises(TrainingError, match=f"{tiny_data}.*differs"):
        run(cfg, resume=True, overrides={"max_steps": 3})


def test_same_step_checkpoint_is_replaced_atomically_and_save_total_limit_prunes(tmp_path):
    from qlora_orpo.training.checkpoint import TrainState, save_checkpoint

    class Model(torch.nn.Module):  # save_pretrained is all a checkpoint needs of the model
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(2))

        def save_pretrained(self, path, safe_serialization=True):
            from safetensors.torch import save_file

            path.mkdir(parents=True)
            save_file({"w": self.w.detach()}, str(path / "adapter_model.safetensors"))

    model = Model()
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    run_dir = tmp_path / "run"
    first = save_checkpoint(run_dir, model, optimizer, scheduler, TrainState(step=3, micro_batches=6), keep=2)
    again = save_checkpoint(run_dir, model, optimizer, scheduler, TrainState(step=3, micro_batches=7), keep=2)
    assert first == again and latest_checkpoint(run_dir) == again
    assert json.loads((again / "state.json").read_text())["train_state"]["micro_batches"] == 7
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step-000003"]
    # A crash between the two renames of a replacement leaves only step-N.old: it is still found.
    again.rename(again.with_name("step-000003.old"))
    assert latest_checkpoint(run_dir).name == "step-000003.old"
    for step in (4, 5, 6):
        save_checkpoint(run_dir, model, optimizer, scheduler, TrainState(step=step), keep=2)
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*") if "." not in p.name)
    assert kept == ["step-000005", "step-000006"]
