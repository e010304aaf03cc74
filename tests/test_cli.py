"""The command line (``memformer-fast``), the recall task of its demo and the byte-LM trainer."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from testing_utils import CLI_TEXT, TINY_CLI, run, small_trainer

from memformer_fast import mrbp
from memformer_fast.app.cli import build_parser, main
from memformer_fast.app.training import Trainer, TrainSettings, load_checkpoint, resumed_settings

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_demo_end_to_end(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A tiny seeded demo: the memory model recalls, the reset model guesses."""
    code, out, _ = run(
        capsys, "demo", "--segments", "4", "--steps-per-stage", "60", "--batch-size", "32",
        "--out", str(tmp_path), "--reach", "5,8",
        "--no-progress",
    )  # fmt: skip
    assert code == 0, out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["accuracy"] >= 0.8, out
    assert report["reset_accuracy"] <= report["chance"] + 0.1
    assert report["accuracy"] - report["reset_accuracy"] >= 0.5
    # MRBP's memory is flat in the rollout length, BPTT's grows with it.
    mem = report["memory_mb"]
    assert mem["bptt@16"] > 2 * mem["mrbp@16"] and mem["bptt@16"] > 2 * mem["bptt@4"]
    assert (tmp_path / "learning_curves.png").stat().st_size > 10_000
    for label in ("accuracy, with memory", "memory reset", "chance level", "tokens/s", "MRBP"):
        assert label in out
    # Recall beyond the trained length, streamed: one row per --reach length, in the JSON too.
    assert "recall after 5 segments" in out and "recall after 8 segments" in out
    assert set(report["reach"]) == {"5", "8"} and report["reach"]["5"] >= 0.8


# ------------------------------------------------------------------------------ train, generate


def test_train_then_generate(
    capsys: pytest.CaptureFixture[str], corpus: Path, tmp_path: Path
) -> None:
    out_dir = tmp_path / "run"
    code, out, err = run(
        capsys, "train", str(corpus), "--out", str(out_dir), *TINY_CLI, "--steps", "4",
        "--eval-every", "2", "--eval-bytes", "256",
    )  # fmt: skip
    assert code == 0, err
    assert "held-out" in out and "bits/byte" in out
    ckpt = load_checkpoint(out_dir)
    assert ckpt["step"] == 4 and ckpt["memory"].shape == (4, 4, 32)
    assert [h["step"] for h in ckpt["history"]] == [2, 4]
    # Resume to a larger --steps.
    code, out, err = run(capsys, "train", str(corpus), "--out", str(out_dir), "--resume",
                         "--steps", "5", "--no-progress")  # fmt: skip
    assert code == 0, err
    assert "resuming at step 4" in out and load_checkpoint(out_dir)["step"] == 5

    code, out, err = run(capsys, "generate", str(out_dir), "--prompt", "def ", "--max-bytes", "40")
    assert code == 0, err
    assert out.startswith("def ") and len(out.encode("utf-8", "replace")) >= 4 + 20
    code, greedy1, _ = run(capsys, "generate", str(out_dir / "checkpoint.pt"), "--temperature",
                           "0", "--max-bytes", "20")  # fmt: skip
    code, greedy2, _ = run(capsys, "generate", str(out_dir), "--temperature", "0",
                           "--max-bytes", "20")  # fmt: skip
    assert code == 0 and greedy1 == greedy2


@pytest.mark.parametrize("how", ["ctrl-c mid-step", "ctrl-c before the update", "shorter run"])
def test_resume_equals_an_uninterrupted_run(
    how: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Train N steps, or stop after k and resume to N: the same parameters, optimizer state,
    memory and random state (dropout is on, so the random state matters)."""
    n, k = 7, 3
    reference = small_trainer(n)
    assert reference.train(progress=False) == "done"

    path = tmp_path / "checkpoint.pt"
    first = small_trainer(k if how == "shorter run" else n)
    if how != "shorter run":
        real_backward = mrbp.backward
        calls = []

        def interrupting_backward(*args, **kwargs):
            calls.append(1)
            if how == "ctrl-c mid-step" and len(calls) == k + 1:
                raise KeyboardInterrupt  # Ctrl-C inside the step: it is not committed
            result = real_backward(*args, **kwargs)
            if how == "ctrl-c before the update" and len(calls) == k:
                torch.randn(3)  # whatever ran after the step must not leak into the checkpoint
                raise KeyboardInterrupt
            return result

        monkeypatch.setattr(mrbp, "backward", interrupting_backward)
        assert first.train(path, progress=False) == "interrupted"
        monkeypatch.setattr(mrbp, "backward", real_backward)
        expected_step = k if how == "ctrl-c mid-step" else k - 1
    else:
        assert first.train(path, progress=False) == "done"
        expected_step = k
    ckpt = load_checkpoint(path)
    assert ckpt["step"] == expected_step
    torch.manual_seed(1234)  # the resumed run must not depend on the process's random state
    resumed = Trainer.resume(ckpt, first.data, resumed_settings(ckpt, {"steps": n}))
    assert resumed.train(progress=False) == "done"

    assert resumed.step == reference.step == n
    for (name, a), b in zip(
        reference.model.state_dict().items(), resumed.model.state_dict().values()
    ):
        assert torch.equal(a, b), name
    assert torch.equal(reference.memory, resumed.memory)
    sa, sb = reference.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    assert torch.equal(reference.rng_state["torch"], resumed.rng_state["torch"])
    assert resumed.clip.state_dict() == reference.clip.state_dict()
    # A shorter first run evaluates at its last step too: one more entry in the history.
    assert all(entry in resumed.history for entry in reference.history)


# ------------------------------------------------------------------------------------- errors


def _assert_clean_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    assert "Traceback" not in err and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err


def test_errors_are_one_line(
    capsys: pytest.CaptureFixture[str], corpus: Path, tmp_path: Path
) -> None:
    code, _, err = run(capsys, "train", str(tmp_path / "missing.txt"), *TINY_CLI)
    _assert_clean_error(code, err, "no such file", "missing.txt")

    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    code, _, err = run(capsys, "train", str(empty), *TINY_CLI)
    _assert_clean_error(code, err, "empty")

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "data.bin").write_bytes(b"\0\1\2")
    code, _, err = run(capsys, "train", str(folder), *TINY_CLI)
    _assert_clean_error(code, err, "no text files")

    small = tmp_path / "small.txt"
    small.write_bytes(b"too short")
    code, _, err = run(capsys, "train", str(small), *TINY_CLI)
    _assert_clean_error(code, err, "needs at least")

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a checkpoint")
    code, _, err = run(capsys, "generate", str(bad))
    _assert_clean_error(code, err, "not a readable checkpoint")
    torch.save({"weights": torch.zeros(2)}, bad)
    code, _, err = run(capsys, "generate", str(bad))
    _assert_clean_error(code, err, "not a memformer-fast checkpoint")
    code, _, err = run(capsys, "generate", str(tmp_path / "nowhere"))
    _assert_clean_error(code, err, "no checkpoint")

    out_dir = tmp_path / "run"
    args = ["train", str(corpus), "--out", str(out_dir), *TINY_CLI, "--steps", "1"]
    assert run(capsys, *args)[0] == 0
    before = (out_dir / "checkpoint.pt").read_bytes()
    code, _, err = run(capsys, *args)  # would overwrite the run
    _assert_clean_error(code, err, "exists", "--resume")
    code, _, err = run(capsys, *args, "--resume", "--d-model", "64")
    _assert_clean_error(code, err, "d_model=32", "not 64")
    code, _, err = run(capsys, *args, "--resume", "--batch-size", "8")
    _assert_clean_error(code, err, "--batch-size 4", "not 8")
    other = tmp_path / "other.txt"
    other.write_bytes(CLI_TEXT[::-1])
    code, _, err = run(capsys, "train", str(other), "--out", str(out_dir), "--resume")
    _assert_clean_error(code, err, "other data")
    assert (out_dir / "checkpoint.pt").read_bytes() == before  # nothing lost

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(before[: len(before) // 2])
    code, _, err = run(capsys, "generate", str(truncated))
    _assert_clean_error(code, err, "corrupt or truncated")


def _shown(default: object) -> str:
    """A default as the help writes it (a tuple of lengths as ``16,256,4096``, a newline as
    ``'\\n'``)."""
    if isinstance(default, tuple):
        return ",".join(map(str, default))
    return repr(default) if isinstance(default, str) and not default.isprintable() else str(default)


def test_help_describes_every_command_and_flag_with_its_default() -> None:
    """Every command has a description; every action of every parser has help text; a flag that
    takes a value names its default (the value itself when argparse holds it; ``train``'s
    run settings quote ``TrainSettings``, since a resumed run takes the checkpoint's)."""
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(commands.choices) == {"demo", "train", "eval", "generate", "export", "info"}
    settings = TrainSettings()
    for name, command in [("memformer-fast", parser), *commands.choices.items()]:
        assert command.description, f"{name} has no description"
        assert command.format_help().startswith("usage:")  # renders (a stray % would raise)
        for action in command._actions:
            where = f"{name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help and action.help != argparse.SUPPRESS, f"{where}: no help"
            if isinstance(action, argparse._HelpAction) or not action.option_strings:
                continue
            if action.nargs == 0:  # a switch (store_true, --version): off unless given
                continue
            if action.default is not None:
                assert f"default {_shown(action.default)}" in action.help, where
            elif name == "train" and action.dest in vars(settings):
                assert f"default {getattr(settings, action.dest)}" in action.help, where
            else:
                assert "default" in action.help, where


def test_info_and_module_entry_point(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "info")
    assert code == 0
    for label in ("torch", "triton", "python", "backend reference", "backend triton", "_C"):
        assert label in out
    with pytest.raises(SystemExit) as exit_info:
        main(["bogus"])
    assert exit_info.value.code == 2
    proc = subprocess.run(
        [sys.executable, "-m", "memformer_fast", "--version"], capture_output=True, text=True
    )
    assert proc.returncode == 0 and proc.stdout.startswith("memformer-fast ")


# ------------------------------------------------------------------------------- bad flags

BAD_FLAGS = [
    # (case, argv after the command's own required arguments, fragments of the one line)
    ("train-threads-negative", ["train", "--threads", "-1"], ["--threads", "must be >= 1", "-1"]),
    ("train-threads-zero", ["train", "--threads", "0"], ["--threads", "must be >= 1"]),
    ("train-device-unknown", ["train", "--device", "foo"], ["--device 'foo' is not a device"]),
    ("train-device-other-type", ["train", "--device", "meta"], ["only cpu and cuda"]),
    ("train-seed-too-large", ["train", "--seed", str(2**64)], ["--seed", "must be in [0, 2**63"]),
    ("train-seed-negative", ["train", "--seed", "-1"], ["--seed", "must be in [0, 2**63"]),
    ("train-seed-not-int", ["train", "--seed", "1.5"], ["--seed", "expected an integer"]),
    ("train-encdec-one-segment", ["train", "--architecture", "encoder-decoder", "--segments", "1"],
     ["--segments must be >= 2 with --architecture encoder-decoder", "got 1"]),
    ("train-lr-inf", ["train", "--lr", "inf"], ["--lr", "must be a finite number, got inf"]),
    ("train-lr-nan", ["train", "--lr", "nan"], ["--lr", "must be a finite number, got nan"]),
    ("train-lr-zero", ["train", "--lr", "0"], ["--lr must be a finite number > 0, got 0.0"]),
    ("train-dropout-one", ["train", "--dropout", "1"], ["dropout must be in [0, 1), got 1.0"]),
    ("train-batch-size-zero", ["train", "--batch-size", "0"], ["--batch-size", "must be >= 1"]),
    ("train-steps-negative", ["train", "--steps", "-5"], ["--steps", "must be >= 0, got -5"]),
    ("train-d-model-word", ["train", "--d-model", "wide"], ["--d-model", "expected an integer"]),
    ("train-heads-divide", ["train", "--n-heads", "3"], ["d_model (32) must be divisible"]),
    ("train-val-fraction", ["train", "--val-fraction", "1.5"], ["--val-fraction must be in"]),
    ("train-grad-clip-factor", ["train", "--grad-clip-factor", "0.5"],
     ["--grad-clip-factor must be 0 (off) or >= 1, got 0.5"]),
    ("train-max-bytes-zero", ["train", "--max-bytes", "0"], ["--max-bytes", "must be >= 1"]),
    ("generate-temperature-inf", ["generate", "--temperature", "inf"],
     ["--temperature", "must be a finite number, got inf"]),
    ("generate-temperature-negative", ["generate", "--temperature", "-1"],
     ["--temperature", "must be >= 0"]),
    ("generate-top-k-negative", ["generate", "--top-k", "-2"], ["--top-k", "must be >= 0"]),
    ("generate-max-bytes-negative", ["generate", "--max-bytes", "-1"], ["--max-bytes", ">= 0"]),
    ("generate-threads-negative", ["generate", "--threads", "-1"], ["--threads", "must be >= 1"]),
    ("generate-seed-too-large", ["generate", "--seed", str(2**64)], ["--seed", "2**63"]),
    ("generate-device-unknown", ["generate", "--device", "gpu0"], ["--device 'gpu0'"]),
    ("demo-threads-negative", ["demo", "--threads", "-1"], ["--threads", "must be >= 1"]),
    ("demo-segments-one", ["demo", "--segments", "1"], ["--segments", "must be >= 2"]),
    ("demo-seed-too-large", ["demo", "--seed", str(2**64)], ["--seed", "2**63"]),
    # torch.set_num_threads(100000) crashes the process (exit 139): the flag is checked first
    ("train-threads-too-many", ["train", "--threads", "100000"],
     ["--threads", "(the CPUs of this machine), got 100000"]),
    ("generate-threads-too-many", ["generate", "--threads", "100000"],
     ["--threads", "must be at most"]),
    ("demo-threads-too-many", ["demo", "--threads", "100000"], ["--threads", "must be at most"]),
]  # fmt: skip
# The ones that once crashed a process, also run as real processes (the rest run in-process:
# same code).
SUBPROCESS_FLAGS = {"train-threads-negative", "train-device-unknown", "train-seed-too-large",
                    "train-encdec-one-segment", "generate-temperature-inf",
                    "train-threads-too-many", "generate-threads-too-many",
                    "demo-threads-too-many"}  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("generate")
    (folder / "corpus.txt").write_bytes(CLI_TEXT)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    code = main(["train", str(folder / "corpus.txt"), "--out", str(folder / "run"), *TINY_CLI,
                 "--steps", "1"])  # fmt: skip
    torch.set_num_threads(threads)
    assert code == 0
    return folder / "run"


def _full_argv(argv: list[str], corpus: Path, tmp_path: Path, checkpoint: Path) -> list[str]:
    command, rest = argv[0], argv[1:]
    if command == "train":
        model = TINY_CLI if "--architecture" not in rest else TINY_CLI + ["--segments", "1"]
        return ["train", str(corpus), "--out", str(tmp_path / "run"), *model, *rest]
    if command == "generate":
        return ["generate", str(checkpoint), "--max-bytes", "2", *rest]
    return [command, "--out", str(tmp_path / "demo"), *rest]


@pytest.mark.parametrize("case", BAD_FLAGS, ids=[c[0] for c in BAD_FLAGS])
def test_bad_flags_are_one_line_with_status_2(
    case: tuple, capsys: pytest.CaptureFixture[str], corpus: Path, tmp_path: Path,
    checkpoint_dir: Path,
) -> None:  # fmt: skip
    name, argv, fragments = case
    argv = _full_argv(argv, corpus, tmp_path, checkpoint_dir)
    if name in SUBPROCESS_FLAGS:
        proc = subprocess.run([sys.executable, "-m", "memformer_fast", *argv],
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        code, err = proc.returncode, proc.stderr
    else:
        try:
            code = main(argv)
        except SystemExit as exit_info:  # the parser's own errors
            code = int(exit_info.code or 0)
        err = capsys.readouterr().err
    _assert_clean_error(code, err, *fragments)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_generate_into_a_closed_pipe_is_quiet(checkpoint_dir: Path) -> None:
    """``memformer-fast generate ... | head -c 10``: no traceback, status 0."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "memformer_fast", "generate", str(checkpoint_dir), "--max-bytes",
         "100000", "--prompt", "x" * 50],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    head = proc.stdout.read(10)
    proc.stdout.close()  # what `head` does once it has its bytes
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0, err
    assert head == b"x" * 10 and err == b"", err


def test_generate_takes_any_prompt_bytes(checkpoint_dir: Path) -> None:
    """A non-UTF-8 prompt reaches the model as its bytes; the output is UTF-8 text."""
    proc = subprocess.run(
        [sys.executable, "-m", "memformer_fast", "generate", str(checkpoint_dir), "--prompt",
         b"ab\xffc\xe2\x82", "--max-bytes", "5", "--temperature", "0"],
        capture_output=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ab\ufffdc".encode()) and b"Traceback" not in proc.stderr
    proc.stdout.decode("utf-8")  # valid text
    from memformer_fast.app.evaluation import stream_bytes
    from memformer_fast.app.training import load_model

    model = load_model(checkpoint_dir)
    expected = bytes(stream_bytes(model, b"ab\xffc\xe2\x82", 5, temperature=0.0))
    whole = b"ab\xffc\xe2\x82" + expected + b"\n"
    assert proc.stdout.decode() == whole.decode("utf-8", "replace")


def test_generate_takes_threads(
    capsys: pytest.CaptureFixture[str], checkpoint_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    threads = min(3, os.cpu_count() or 1)  # at most the machine's CPUs
    code, _, err = run(capsys, "generate", str(checkpoint_dir), "--max-bytes", "2", "--threads",
                       str(threads), "--device", "cpu")  # fmt: skip
    assert code == 0, err
    assert calls == [threads]
    code, _, _ = run(capsys, "generate", str(checkpoint_dir), "--max-bytes", "2", "--device", "cpu")
    assert code == 0 and calls == [threads, 1]  # default: one thread on the CPU


def test_train_compile_flag_reaches_mrbp(
    capsys: pytest.CaptureFixture[str],
    corpus: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``train --compile`` runs every MRBP step with ``compile=True`` (recorded here, then run
    eagerly: the compiled step itself is tested in test_compiled.py), and is saved in the run's
    settings; without the flag, ``compile=False``."""
    seen: list[object] = []
    real = mrbp.backward

    def recording(*args, compile=False, **kwargs):
        seen.append(compile)
        return real(*args, **kwargs)

    monkeypatch.setattr(mrbp, "backward", recording)
    out_dir = tmp_path / "run"
    args = ["train", str(corpus), "--out", str(out_dir), *TINY_CLI, "--steps", "2"]
    assert run(capsys, *args, "--compile")[0] == 0
    assert seen == [True, True]
    assert torch.load(out_dir / "checkpoint.pt", weights_only=False)["settings"]["compile"]
    seen.clear()
    assert run(capsys, *args[:3], str(tmp_path / "plain"), *args[4:])[0] == 0
    assert seen == [False, False]
