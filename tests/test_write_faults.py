"""Fault injection for the adapter directory and the merged export (issue 20): a write that fails
or is killed leaves nothing under the final name, and any earlier adapter or export as it was.

A failed write is one line naming the directory, the file and the free space; the temporary
sibling is removed. A writer killed mid-write leaves only its own ``.<name>.tmp-<pid>-*``
sibling, which the next writer of that name removes (its pid is dead). The RLIMIT_FSIZE case
runs the real ``qlora-orpo export`` in a child, where a write past the limit fails with EFBIG.
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import peft.peft_model
import pytest
from conftest import build_tiny_llama, build_tokenizer
from safetensors import SafetensorError
from test_export import load_base, non_identity_lora

from qlora_orpo.config import OrpoConfig
from qlora_orpo.core import files as F
from qlora_orpo.core.errors import AdapterError
from qlora_orpo.export import adapters as A
from qlora_orpo.export import merged as E

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A saved tiny base, a non-identity adapter with a card beside it, and one merged export of it."""
    root = tmp_path_factory.mktemp("write-faults")
    tokenizer = build_tokenizer()
    build_tiny_llama(tie=True).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    model, tokenizer = load_base(root / "base")
    peft_model = non_identity_lora(model)
    cfg = OrpoConfig(model=str(root / "base"), eval_fraction=0.0)
    adapter = A.save_adapter(peft_model, tokenizer, cfg, root / "adapter")
    E.export_merged(adapter, root / "merged", verify=False)
    return {"root": root, "adapter": adapter, "merged": root / "merged", "peft": peft_model,
            "tokenizer": tokenizer, "cfg": cfg}


def digest(directory: Path, card: bool = True) -> dict[str, str]:
    """sha256 of every file under ``directory``: an earlier adapter or export must come out unchanged.
    ``card=False`` leaves out README.md, which a new write dates anew."""
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and (card or p.name != "README.md")}


def siblings(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


def failing_save_file(error: BaseException):
    """peft's safetensors writer, failing after it has written part of the file (as a full disk does)."""
    def save(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"\0" * 100)
        raise error
    return save


FAILURES = {  # the writer that fails, the error it raises, the file the one line must name
    "weights, SafetensorError": ("weights", SafetensorError("Error while serializing: IoError(No space left)"),
                                 "adapter_model.safetensors"),
    "weights, ENOSPC": ("weights", OSError(errno.ENOSPC, "No space left on device"), "adapter_model.safetensors"),
    "card, EFBIG": ("card", OSError(errno.EFBIG, "File too large", "README.md.tmp"), "README.md.tmp"),
}


@pytest.mark.parametrize("case", FAILURES)
@pytest.mark.parametrize("previous", [True, False], ids=["over-an-adapter", "new"])
def test_a_failed_adapter_write_is_one_line_and_keeps_the_previous_adapter(tiny, tmp_path, monkeypatch, case,
                                                                            previous):
    writer, error, named = FAILURES[case]
    target = tmp_path / "adapter"
    if previous:
        A.save_adapter(tiny["peft"], tiny["tokenizer"], tiny["cfg"], target)
    before = digest(target) if previous else None
    if writer == "weights":
        monkeypatch.setattr(peft.peft_model, "safe_save_file", failing_save_file(error))
    else:
        def card_fails(path, text):
            raise error
        monkeypatch.setattr(A, "atomic_write_text", card_fails)
    with pytest.raises(AdapterError) as caught:
        A.save_adapter(tiny["peft"], tiny["tokenizer"], tiny["cfg"], target)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{target}: could not write {named} (")
    assert "free on its disk" in message
    assert ("the previous adapter there is kept" if previous else "none was there before") in message
    assert (digest(target) if previous else target.exists()) == (before if previous else False)
    assert siblings(target) == []  # the temporary directory went with the error


def test_a_failed_export_write_keeps_the_earlier_export(tiny, tmp_path, monkeypatch):
    out = tmp_path / "merged"
    E.export_merged(tiny["adapter"], out, verify=False)
    before = digest(out)
    import transformers.modeling_utils as M

    monkeypatch.setattr(M, "safe_save_file", failing_save_file(SafetensorError("Error while serializing")))
    with pytest.raises(E.ExportError) as caught:
        E.export_merged(tiny["adapter"], out, verify=False)
    message = str(caught.value)
    assert message.startswith(f"{out}: could not write model*.safetensors (") and "\n" not in message
    assert "the earlier export there is kept" in message and "free on its disk" in message
    assert digest(out) == before and siblings(out) == []


# The child: the real CLI with every file it writes limited to LIMIT bytes (a full disk: EFBIG).
CHILD_FULL_DISK = r"""
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
from qlora_orpo.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_export_on_a_full_disk_is_one_line_and_keeps_the_earlier_export(tiny):
    out = tiny["merged"]
    before = digest(out)
    weights = max(p.stat().st_size for p in out.glob("model*.safetensors"))
    child = subprocess.run([sys.executable, "-c", CHILD_FULL_DISK, str(weights // 2), "export", "--adapter",
                            str(tiny["adapter"]), "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                           timeout=600)
    assert child.returncode == 2, child.stderr[-3000:]
    errors = [line for line in child.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in child.stderr, child.stderr[-3000:]
    assert f"{out}: could not write model*.safetensors (" in errors[0]
    assert "the earlier export there is kept" in errors[0] and "free on its disk" in errors[0]
    assert digest(out) == before and siblings(out) == []


# The child: writes the adapter or the export over an earlier one and kills itself with SIGKILL
# once the weights are in the temporary directory, before the card (the last file) is written.
CHILD_KILLED = r"""
import os, signal, sys
from pathlib import Path
from qlora_orpo.export import adapters as A, merged as E
what, source, target = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
if what == "adapter":
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    base = Path(sys.argv[4])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(source))
    A.render_card = die
    A.save_adapter(model, AutoTokenizer.from_pretrained(base), None, target)
else:
    E.atomic_write_text = die
    E.export_merged(source, target, verify=False)
"""


@pytest.mark.parametrize("what", ["adapter", "merged"])
def test_a_writer_killed_mid_write_leaves_the_previous_directory_and_the_next_writer_clears_its_debris(tiny, what):
    target = tiny[what]
    before = digest(target)
    child = subprocess.run([sys.executable, "-c", CHILD_KILLED, what, str(tiny["adapter"]), str(target),
                            str(tiny["root"] / "base")], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert child.returncode == -9, child.stderr[-3000:]
    assert digest(target) == before
    debris = siblings(target)
    assert len(debris) == 1 and debris[0].startswith(f".{target.name}.tmp-")
    assert list((target.parent / debris[0]).glob("*.safetensors"))  # it was killed mid-write, weights written
    if what == "adapter":
        A.save_adapter(tiny["peft"], tiny["tokenizer"], tiny["cfg"], target)
    else:
        E.export_merged(tiny["adapter"], target, verify=False)
    assert siblings(target) == []  # the dead writer's directory is gone
    assert digest(target, card=False) == {k: v for k, v in before.items() if k != "README.md"}  # the same bytes


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_writer_killed_between_the_two_renames_gets_its_previous_directory_back(tmp_path):
    """Where the kernel cannot exchange two directories, the previous one is parked as .<name>.old-<pid>;
    the next writer puts it back if its writer died before the new one took the name."""
    target = tmp_path / "export"
    parked = tmp_path / f".export.old-{dead_pid()}"
    parked.mkdir()
    (parked / "model.safetensors").write_bytes(b"previous")
    F.make_temp_dir(target)
    assert (target / "model.safetensors").read_bytes() == b"previous" and not parked.exists()


def test_debris_of_a_live_writer_is_left_alone(tmp_path):
    target = tmp_path / "adapter"
    alive = tmp_path / f".adapter.tmp-{os.getpid()}-x"
    dead = tmp_path / f".adapter.tmp-{dead_pid()}-y"
    alive.mkdir()
    dead.mkdir()
    tmp = F.make_temp_dir(target)
    assert alive.is_dir() and not dead.exists() and tmp.name.startswith(f".adapter.tmp-{os.getpid()}-")


def test_replace_dir_exchanges_with_the_previous_directory(tmp_path, monkeypatch):
    """One atomic exchange on Linux; the two-rename fallback elsewhere; both leave only the new directory."""
    if sys.platform == "linux":
        a, b = tmp_path / "a", tmp_path / "b"
        a.mkdir()
        b.mkdir()
        (a / "x").write_text("a")
        assert F._exchange(a, b) and (b / "x").read_text() == "a" and not (a / "x").exists()
    for exchange in (True, False):
        target = tmp_path / f"out-{exchange}"
        target.mkdir()
        (target / "a").write_text("old")
        new = F.make_temp_dir(target)
        (new / "a").write_text("new")
        if not exchange:
            monkeypatch.setattr(F, "_exchange", lambda a, b: False)
        F.replace_dir(new, target)
        assert (target / "a").read_text() == "new" and siblings(target) == []
