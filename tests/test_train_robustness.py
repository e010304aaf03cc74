"""``train`` and checkpoints when things go wrong: unwritable or full output folders,
signals, divergence, interrupted evaluations, corrupted and hand-edited checkpoints."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from testing_utils import TINY_CLI, run, small_trainer

from memformer_fast.app import disk
from memformer_fast.app.errors import UserError
from memformer_fast.app.training import (
    Trainer,
    load_checkpoint,
    resumed_settings,
)

TINY = [*TINY_CLI, "--threads", "1"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


def cli(*argv: str | bytes, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "memformer_fast", *argv],
        capture_output=True,
        env=ENV,
        timeout=120,
        **kwargs,
    )


def one_line_error(code: int, err: str | bytes, *fragments: str) -> None:
    text = err.decode() if isinstance(err, bytes) else err
    assert code == 2, text
    assert "Traceback" not in text and text.strip().count("\n") == 0, text
    for fragment in fragments:
        assert fragment in text, text


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "checkpoint.pt")


# ------------------------------------------------------------------------- the output folder


def read_only_dir(tmp_path: Path) -> Path:
    """A folder nobody can write: chmod 555, or (as root, who ignores modes) /sys/kernel."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, Path("/sys/kernel")):
        try:
            (candidate / ".probe").touch()
        except OSError:
            return candidate
        (candidate / ".probe").unlink()
    pytest.skip("no read-only folder on this machine")


def test_out_that_is_a_file_fails_at_start(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "a-file"
    out.write_text("x")
    proc = cli("train", str(corpus), "--out", str(out), *TINY, "--steps", "2")
    one_line_error(proc.returncode, proc.stderr, "is a file, not a folder")
    assert out.read_text() == "x"
    under = cli("train", str(corpus), "--out", str(out / "sub"), *TINY, "--steps", "2")
    one_line_error(under.returncode, under.stderr, f"{out} is a file, not a folder")


def test_read_only_out_fails_at_start(corpus: Path, tmp_path: Path) -> None:
    out = read_only_dir(tmp_path)
    start = time.perf_counter()
    proc = cli("train", str(corpus), "--out", str(out), *TINY, "--steps", "1000")
    one_line_error(proc.returncode, proc.stderr, "cannot be written", "choose a writable --out")
    assert b"step" not in proc.stdout  # refused before training, not at the first save
    proc = cli("train", str(corpus), "--out", str(out / "new" / "run"), *TINY, "--steps", "1")
    one_line_error(proc.returncode, proc.stderr, "cannot be written")
    assert time.perf_counter() - start < 60


def test_too_little_free_space_fails_at_start(
    capsys: pytest.CaptureFixture[str], corpus: Path, tmp_path: Path, monkeypatch
) -> None:
    real = disk.shutil.disk_usage
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda p: real(p)._replace(free=64 * 1024))
    code, out, err = run(capsys, "train", str(corpus), "--out", str(tmp_path / "o"), *TINY)
    one_line_error(code, err, "0.1 MiB free, a checkpoint needs about")
    assert "step" not in out
    assert not (tmp_path / "o").exists()  # nothing created


def full_disk_after(saves: int) -> Callable[[Path, memoryview], None]:
    """A ``disk.write_file`` that works ``saves`` times, then writes half and fails like a full
    disk."""
    real, calls = disk.write_file, []

    def write(path: Path, data: memoryview) -> None:
        calls.append(path)
        if len(calls) <= saves:
            return real(path, data)
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    return write


def test_full_disk_keeps_the_previous_checkpoint_and_no_temp_file(
    capsys: pytest.CaptureFixture[str], corpus: Path, tmp_path: Path, monkeypatch
) -> None:
    out = tmp_path / "run"
    monkeypatch.setattr(disk, "write_file", full_disk_after(1))
    code, _, err = run(capsys, "train", str(corpus), "--out", str(out), *TINY, "--steps", "4",
                       "--save-every", "2", "--eval-every", "100")  # fmt: skip
    one_line_error(code, err, "could not save", "(step 4)", "No space left on device",
                   "the checkpoint of step 2 is intact")  # fmt: skip
    assert load_checkpoint(out)["step"] == 2
    assert leftovers(out) == []


def test_read_only_mid_run_says_nothing_was_written(
    capsys: pytest.CaptureFixture[str], corpus: Path, tmp_path: Path, monkeypatch
) -> None:
    def read_only(path: Path, data: memoryview) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(disk, "write_file", read_only)
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", str(corpus), "--out", str(out), *TINY, "--steps", "2")
    one_line_error(code, err, "Read-only file system", "no checkpoint was written")
    assert not out.exists()  # made by the run (for its lock), nothing saved in it: removed


def test_save_interrupted_mid_write_leaves_no_temp_file(tmp_path: Path, monkeypatch) -> None:
    trainer = small_trainer(steps=1)
    path = tmp_path / "checkpoint.pt"
    trainer.save(path)
    before = path.read_bytes()

    def interrupted(path: Path, data: memoryview) -> None:
        path.write_bytes(bytes(data[:100]))
        raise KeyboardInterrupt

    monkeypatch.setattr(disk, "write_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.save(path)
    assert path.read_bytes() == before and leftovers(tmp_path) == []


# ----------------------------------------------------------------------------------- signals


def train_command(corpus: Path, out: Path, steps: int = 100_000, save_every: int = 100_000,
                  program: str | None = None) -> list[str]:  # fmt: skip
    """A tiny ``train`` run that evaluates after every step (on 64 bytes), so each step prints a
    line; ``program``: a ``python -c`` script (one that patches the trainer) in place of
    ``python -m memformer_fast``."""
    start = ["-m", "memformer_fast"] if program is None else ["-c", program]
    return [sys.executable, *start, "train", str(corpus), "--out", str(out), *TINY,
            "--steps", str(steps), "--save-every", str(save_every), "--eval-every", "1",
            "--eval-bytes", "64"]  # fmt: skip


@contextmanager
def training_past(step: int, command: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    """``command`` (from :func:`train_command`) running in a child process, yielded once it has
    printed step ``step``; killed on the way out, whatever the test did with it."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        for line in proc.stdout:
            if line.startswith(f"step {step}:".encode()):
                break
        yield proc
    finally:
        proc.kill()


def assert_stopped_and_saved(proc: subprocess.Popen[bytes], signum: int, err: bytes) -> None:
    """The run ended as ``signum`` asks (exit status 128 + signum), saying it saved, cleanly."""
    assert proc.returncode == 128 + signum, err
    assert b"Traceback" not in err and b"saved step" in err, err


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_signals_save_a_resumable_checkpoint(sig: str, corpus: Path, tmp_path: Path) -> None:
    """SIGTERM (schedulers) and SIGHUP (a closed terminal) save like Ctrl-C."""
    signum = getattr(signal, sig)
    out = tmp_path / "run"
    with training_past(3, train_command(corpus, out)) as proc:
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    assert_stopped_and_saved(proc, signum, err)
    ckpt = load_checkpoint(out)
    assert ckpt["step"] >= 3 and leftovers(out) == []
    # Nothing lost: every completed step has its evaluation, finished or pending.
    evaluated = [h["step"] for h in ckpt["history"]]
    if ckpt["pending_eval"] is not None:
        evaluated.append(ckpt["pending_eval"]["step"])
    assert evaluated == list(range(1, ckpt["step"] + 1))
    resumed = cli("train", str(corpus), "--out", str(out), "--resume", "--steps",
                  str(ckpt["step"] + 1), "--no-progress", "--threads", "1")  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    history = load_checkpoint(out)["history"]
    assert [h["step"] for h in history] == list(range(1, ckpt["step"] + 2))


DROPPED_SIGNAL = """
import signal, sys
from memformer_fast.app import training
from memformer_fast.app.cli import main
real = training.Trainer.train_step
class RaisesInFinalizer:
    def __del__(self):  # the handler runs here: its exception is printed and dropped
        signal.raise_signal(signal.SIGTERM)
def train_step(self):
    if self.step == 2:
        RaisesInFinalizer()
        print("dropped", file=sys.stderr, flush=True)
    return real(self)
training.Trainer.train_step = train_step
sys.exit(main(sys.argv[1:]))
"""


def test_a_signal_dropped_in_a_finalizer_still_stops_training(corpus: Path, tmp_path: Path) -> None:
    """A signal whose handler runs inside ``__del__`` (or a GC callback) has its exception dropped
    by Python; the handler ignored every later signal, so training ran on for good (seen once under
    load as a SIGINT that never stopped the run). It now stops before the next step and saves."""
    out = tmp_path / "run"
    command = train_command(corpus, out, steps=50, program=DROPPED_SIGNAL)
    done = subprocess.run(command, capture_output=True, env=ENV, timeout=120)
    assert b"dropped" in done.stderr and b"Exception ignored" in done.stderr, done.stderr
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert b"saved step" in done.stderr, done.stderr
    assert load_checkpoint(out)["step"] == 3


SLOW_SAVE = """
import sys, time
from memformer_fast.app import training
from memformer_fast.app.cli import main
real = training.Trainer.save
def slow_save(self, path):  # a large model's save: seconds of serialising and writing
    print("saving", file=sys.stderr, flush=True)
    time.sleep(1.5)
    return real(self, path)
training.Trainer.save = slow_save
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_second_signal_during_the_save_loses_nothing(
    sig: str, corpus: Path, tmp_path: Path
) -> None:
    """A second SIGTERM (schedulers re-send it) or Ctrl-C while the stopping run saves is
    ignored until the checkpoint is on disk: restoring the handlers before the save would let it
    kill the process with nothing saved."""
    signum = getattr(signal, sig)
    out = tmp_path / "run"
    with training_past(2, train_command(corpus, out, program=SLOW_SAVE)) as proc:
        proc.send_signal(signum)
        assert proc.stderr is not None and proc.stderr.readline().strip() == b"saving"
        for _ in range(3):  # mid-save
            proc.send_signal(signum)
            time.sleep(0.1)
        _, err = proc.communicate(timeout=60)
    assert_stopped_and_saved(proc, signum, err)
    assert load_checkpoint(out)["step"] >= 2 and leftovers(out) == []


def test_a_second_run_on_the_same_out_is_refused(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two ``train`` processes on one ``--out`` would overwrite each other's checkpoints (the
    loser reporting the other run's file as its own). The folder is locked
    (``.lock``, released however the holder ends, removed when it ends normally): the second run
    fails at once, saying who holds it, and touches nothing."""
    out = tmp_path / "run"
    with training_past(2, train_command(corpus, out, save_every=1)) as proc:
        for extra in ([], ["--resume"]):
            code, stdout, err = run(capsys, "train", str(corpus), "--out", str(out), *TINY,
                                    "--steps", "3", *extra)  # fmt: skip
            one_line_error(code, err, f"--out {out} is in use by another train run",
                           f"pid {proc.pid} on ", "choose another --out")  # fmt: skip
            assert "step" not in stdout
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert load_checkpoint(out)["step"] >= 2 and leftovers(out) == []  # no .lock left
    code, _, err = run(capsys, "train", str(corpus), "--out", str(out), "--resume", "--steps",
                       str(load_checkpoint(out)["step"] + 1), "--no-progress")  # fmt: skip
    assert code == 0, err  # free again
    fresh = tmp_path / "new" / "run"
    code, _, err = run(capsys, "train", str(corpus / "missing"), "--out", str(fresh), *TINY)
    assert code == 2 and not (tmp_path / "new").exists()  # a failed start leaves no folder


# -------------------------------------------------------------------------------- divergence


def test_divergence_saves_a_finite_checkpoint_and_advises(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = cli("train", str(corpus), "--out", str(out), *TINY, "--steps", "50", "--lr", "300",
               "--warmup-steps", "0")  # fmt: skip
    one_line_error(proc.returncode, proc.stderr, "training diverged", "not finite",
                   "saved the last finite step", "lower --lr (now 300)",
                   "--warmup-steps")  # fmt: skip
    ckpt = load_checkpoint(out)  # finite: load_checkpoint checks every tensor
    assert ckpt["step"] < 50


def test_divergence_keeps_the_last_checkpoint(
    capsys: pytest.CaptureFixture[str], corpus: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    args = ["train", str(corpus), "--out", str(out), *TINY]
    assert run(capsys, *args, "--steps", "2")[0] == 0
    before = (out / "checkpoint.pt").read_bytes()
    code, _, err = run(capsys, *args, "--resume", "--steps", "50", "--lr", "300",
                       "--warmup-steps", "0", "--save-every", "1000")  # fmt: skip
    one_line_error(code, err, "training diverged", "kept the checkpoint of step 2", "--lr")
    assert (out / "checkpoint.pt").read_bytes() == before


# ---------------------------------------------------------------- interrupted evaluation


def test_ctrl_c_during_evaluation_loses_nothing(tmp_path: Path, monkeypatch) -> None:
    reference = small_trainer(6)
    assert reference.train(progress=False) == "done"

    first = small_trainer(6)
    real, calls = Trainer.evaluate, []

    def interrupted(self: Trainer):
        calls.append(self.step)
        if len(calls) == 2:  # the evaluation of step 4
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(Trainer, "evaluate", interrupted)
    path = tmp_path / "checkpoint.pt"
    assert first.train(path, progress=False) == "interrupted"
    monkeypatch.setattr(Trainer, "evaluate", real)
    ckpt = load_checkpoint(path)
    assert ckpt["step"] == 4 and ckpt["pending_eval"]["step"] == 4
    resumed = Trainer.resume(ckpt, first.data, resumed_settings(ckpt, {}))
    assert resumed.train(progress=False) == "done"
    assert resumed.history == reference.history
    for (name, a), b in zip(
        reference.model.state_dict().items(), resumed.model.state_dict().values()
    ):
        assert torch.equal(a, b), name


# --------------------------------------------------------------------- checkpoint integrity


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt")
    trainer = small_trainer(2)
    trainer.train(folder / "checkpoint.pt", progress=False)
    return folder / "checkpoint.pt"


def flip_tensor_bytes(src: Path, dst: Path) -> None:
    """Change 8 bytes inside the first tensor's data, keeping the values finite (low mantissa
    bits of float32), as a bad disk block or bit rot would."""
    raw = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("/data/0"))
    name_len = int.from_bytes(raw[info.header_offset + 26 : info.header_offset + 28], "little")
    extra_len = int.from_bytes(raw[info.header_offset + 28 : info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    for i in range(start, start + 8, 4):
        raw[i] ^= 0x5A
    dst.write_bytes(bytes(raw))


def test_corrupted_tensor_bytes_are_refused(saved: Path, tmp_path: Path, corpus: Path) -> None:
    bad = tmp_path / "checkpoint.pt"
    flip_tensor_bytes(saved, bad)
    with pytest.raises(UserError, match=r"is corrupted: tensor .* does not match its sha256"):
        load_checkpoint(bad)
    proc = cli("generate", str(bad), "--max-bytes", "2")
    one_line_error(proc.returncode, proc.stderr, "is corrupted", "sha256 checksum")


def edit(key: str, value: object) -> Callable[[dict], None]:
    return lambda c: c.__setitem__(key, value)


def set_in(key: str, sub: str, value: object) -> Callable[[dict], None]:
    return lambda c: c[key].__setitem__(sub, value)


def nan_param(c: dict) -> None:
    c["model"]["embed.weight"][0, 0] = float("nan")


HAND_EDITS = {
    "memory-shape": (edit("memory", torch.zeros(2, 3)), "memory must have shape [B, 4, 32]"),
    "memory-dtype": (lambda c: c.__setitem__("memory", c["memory"].double()),
                     "memory must have dtype torch.float32, got torch.float64"),
    "memory-nan": (lambda c: c["memory"].fill_(float("nan")), "memory is not finite"),
    "rng-size": (set_in("rng", "torch", torch.zeros(5, dtype=torch.uint8)),
                 "rng['torch'] is not a CPU generator state"),
    "rng-dtype": (set_in("rng", "torch", torch.zeros(5)), "rng['torch'] must be a 1-D uint8"),
    "rng-missing": (edit("rng", {}), "rng must be a dict holding the 'torch' generator state"),
    "step-negative": (edit("step", -3), "step must be an int >= 0, got -3"),
    "step-string": (edit("step", "7"), "step must be an int >= 0, got '7'"),
    "step-changed": (edit("step", 5), "its fields (step, config, settings, history, ...) do not"),
    "model-nan": (nan_param, "model/embed.weight is not finite"),
    "model-scaled": (lambda c: c["model"]["norm.weight"].mul_(2),
                     "tensor model/norm.weight does not match its sha256 checksum"),
    "history": (edit("history", [{"step": 1}]), "history must be a list of dicts with keys"),
    "config": (set_in("config", "d_model", -1), "has an invalid config"),
    "data": (edit("data", None), "data must be a dict with int fields"),
    "checksum": (edit("checksum", "abc"), "its checksum entry is malformed"),
    "grad-clip": (edit("grad_clip", {"running_norm": -1.0}),
                  "grad_clip: state['running_norm'] must be None or a finite float >= 0"),
    "grad-clip-changed": (edit("grad_clip", {"running_norm": 0.5}), "do not match their checksum"),
    "checksum-missing": (lambda c: c.pop("checksum"), "is incomplete: missing checksum"),
    "grad-clip-missing": (lambda c: c.pop("grad_clip"), "is incomplete: missing grad_clip"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(HAND_EDITS))
def test_hand_edited_checkpoints_are_refused(saved: Path, tmp_path: Path, case: str) -> None:
    change, says = HAND_EDITS[case]
    ckpt = torch.load(saved, weights_only=True)
    change(ckpt)
    bad = tmp_path / "checkpoint.pt"
    torch.save(ckpt, bad)
    with pytest.raises(UserError) as info:
        load_checkpoint(bad)
    assert says in str(info.value) and str(bad) in str(info.value)


def test_checkpoint_of_step_zero_loads(tmp_path: Path) -> None:
    """Before the first update the optimizer holds no tensor: still a valid checkpoint."""
    small_trainer(1).save(tmp_path / "checkpoint.pt")
    assert load_checkpoint(tmp_path)["step"] == 0
