"""Evidence on real text: ``memformer-fast eval`` and the file-aware trainer.

``train --reset-at-file-boundaries`` lays each file out from a segment start with a fresh memory;
``train --memory-reset-every-segment`` is the no-memory baseline; ``eval`` reports bits per byte
with the memory carried and reset, by position in the file. The building blocks are checked
against ``sequence_loss`` and against fresh runs of single files; the command end to end in a
subprocess on a checkpoint trained here.
"""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from testing_utils import TINY_CLI, run, tiny_model

from memformer_fast.app import disk
from memformer_fast.app.data import PAD, ByteData, RolloutInputs, align_documents, rollout_inputs
from memformer_fast.app.evaluation import CARRIED, RESET, evaluate_documents, token_nll
from memformer_fast.app.training import Trainer, TrainSettings, load_checkpoint, resumed_settings

ARCHS = ["encoder-decoder", "decoder"]
FILES = [
    "".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(8 + 5 * i)).encode()
    for i in range(12)
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, text in enumerate(FILES):
        (folder / f"m{i:02d}.py").write_bytes(text)
    return folder


def byte_model(arch: str, **kw):
    return tiny_model(arch, vocab_size=256, segment_length=8, **kw).eval()


# ----------------------------------------------------------------------------- the layout


def test_align_documents_and_the_held_out_split() -> None:
    docs = [b"abcdefghij", b"", b"xyz", b"0123456789abcdef"]
    tokens, offsets = align_documents(docs, 8)
    assert len(tokens) == 16 + 8 + 16 and len(tokens) % 8 == 0
    assert bytes(tokens[offsets != PAD].tolist()) == b"".join(docs)
    assert offsets[:12].tolist() == list(range(10)) + [PAD, PAD]
    assert (tokens[offsets == PAD] == 0).all()
    assert offsets[16:19].tolist() == [0, 1, 2] and offsets[24:40].tolist() == list(range(16))

    data = ByteData.from_documents(FILES, 16, 48, 0.2)
    assert data.train_offsets is not None and data.val_offsets is not None
    assert int(data.val_offsets[0]) == 0, "the held-out part starts with a whole file"
    assert len(data.train) % 16 == 0 and len(data.train) >= 48
    real = torch.cat([data.train[data.train_offsets != PAD], data.val[data.val_offsets != PAD]])
    assert bytes(real.tolist()) == b"".join(FILES)
    assert data.fingerprint == ByteData.from_bytes(b"".join(FILES), 48, 0.2).fingerprint


@pytest.mark.parametrize("arch", ARCHS)
def test_rollout_inputs_mask_reset_and_skip_what_a_fresh_run_skips(arch: str) -> None:
    model = byte_model(arch)
    tokens, offsets = align_documents([b"a" * 11, b"b" * 20], 8)
    ids, offsets = tokens[None], offsets[None]
    inputs = rollout_inputs(model, ids, offsets)
    assert inputs.attention_mask is not None and inputs.labels is not None
    assert inputs.resets is not None
    assert inputs.resets.tolist() == [[True, False, True, False, False]]
    assert torch.equal(inputs.attention_mask, offsets != PAD)
    skipped = (inputs.labels == -100).nonzero()[:, 1].tolist()
    assert skipped == ([0, 16] if arch == "decoder" else list(range(8)) + list(range(16, 24)))
    baseline = rollout_inputs(model, ids, offsets, reset_every_segment=True)
    assert baseline.resets is not None and bool(baseline.resets.all())
    assert baseline.labels is not None and torch.equal(baseline.labels, inputs.labels)
    plain = rollout_inputs(model, ids)
    assert plain.attention_mask is None and plain.labels is None and plain.resets is None


@pytest.mark.parametrize("arch", ARCHS)
def test_token_nll_is_what_sequence_loss_averages(arch: str) -> None:
    model = byte_model(arch)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (3, 8 * 4 + 3), generator=g)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[2, 20:] = False
    labels = ids.masked_fill(torch.rand(ids.shape, generator=g) < 0.2, -100)
    resets = torch.rand(3, 5, generator=g) < 0.4
    inputs = RolloutInputs(mask, labels, resets)
    nll, memory = token_nll(model, ids, None, inputs)
    loss, expected_memory = model.sequence_loss(ids, None, mask, labels, resets=resets)
    assert nll.shape == ids.shape
    scored = ~nll.isnan()
    assert not scored[:, 0].any() and not scored[2, 21:].any()
    if arch == "encoder-decoder":
        assert not scored[:, :8].any()
    torch.testing.assert_close(nll[scored].mean(), loss)
    torch.testing.assert_close(memory, expected_memory)


@pytest.mark.parametrize("arch", ARCHS)
def test_evaluate_documents_equals_fresh_runs_of_each_file(arch: str) -> None:
    """Packed side by side with resets, each file is scored as a fresh run of it alone would
    score it; the reset column is the same model with the memory reset before every segment."""
    model = byte_model(arch)
    docs = [FILES[3][:70], FILES[5][:45], FILES[1][:30]]
    report = evaluate_documents(model, docs, batch_size=2, progress=False)
    totals = {CARRIED: 0.0, RESET: 0.0}
    count = 0
    for doc in docs:
        ids = torch.tensor([list(doc)])
        n = len(doc) - (1 if arch == "decoder" else 8)
        every = torch.ones(1, math.ceil(len(doc) / 8), dtype=torch.bool)
        with torch.no_grad():
            totals[CARRIED] += float(model.sequence_loss(ids)[0]) * n
            totals[RESET] += float(model.sequence_loss(ids, resets=every)[0]) * n
        count += n
    assert report["predicted_bytes"] == count and report["files"] == 3
    for name in (CARRIED, RESET):
        expected = totals[name] / count / math.log(2)
        assert report["bits_per_byte"][name] == pytest.approx(expected, rel=1e-5)
    buckets = report["by_segment_in_file"]
    first = 0 if arch == "decoder" else 1  # the encoder-decoder never predicts a first segment
    assert [b["segments"] for b in buckets] == ["1", "2-4", "5-16"][first:]
    assert sum(b["bytes"] for b in buckets) == count
    if arch == "decoder":  # the first segment of a file reads M_0 either way
        assert buckets[0][CARRIED] == pytest.approx(buckets[0][RESET], rel=1e-6)


def test_trainer_batches_with_file_boundaries() -> None:
    """The trainer hands mrbp.backward the resets, mask and labels of its aligned streams, and
    the no-memory baseline resets every segment."""
    torch.manual_seed(0)
    settings = TrainSettings(batch_size=2, segments=3, steps=2, eval_bytes=96,
                             reset_at_file_boundaries=True)  # fmt: skip
    data = ByteData.from_documents(FILES, 8, 24, settings.val_fraction)
    trainer = Trainer.create(byte_model("decoder").config, data, settings)
    seen = 0
    for step in range(8):
        ids, inputs, _ = trainer._batch(step)
        assert inputs.resets is not None and inputs.labels is not None
        starts = inputs.labels[:, ::8] == -100
        assert torch.equal(inputs.resets, starts & (ids[:, ::8] != 0))
        seen += int(inputs.resets.sum())
    assert seen > 0
    assert trainer.train(progress=False) == "done"
    assert math.isfinite(trainer.history[-1]["bits_per_byte"])

    with pytest.raises(Exception, match="reset_at_file_boundaries"):
        Trainer.create(trainer.model.config, ByteData.from_bytes(b"".join(FILES), 24, 0.1),
                       settings)  # fmt: skip


# --------------------------------------------------------------------------- the commands


def test_train_and_eval_end_to_end(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Train with file-boundary resets (subprocess), the no-memory baseline (in process), then
    `memformer-fast eval` both (subprocess) with --json."""
    with_memory, baseline = tmp_path / "memory", tmp_path / "baseline"
    common = ["--steps", "3", "--eval-every", "3", "--eval-bytes", "256", "--threads", "1"]
    proc = subprocess.run(
        [sys.executable, "-m", "memformer_fast", "train", str(corpus), "--out", str(with_memory),
         *TINY_CLI, *common, "--reset-at-file-boundaries"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "memory reset at file starts" in proc.stdout
    code, out, err = run(
        capsys, "train", str(corpus), "--out", str(baseline), *TINY_CLI, *common,
        "--memory-reset-every-segment",
    )  # fmt: skip
    assert code == 0, err
    assert "memory reset every segment" in out
    assert load_checkpoint(baseline)["settings"]["memory_reset_every_segment"] is True
    # The flags belong to the run: resuming with another choice is refused.
    code, _, err = run(capsys, "train", str(corpus), "--out", str(with_memory), "--resume",
                       "--memory-reset-every-segment", "--steps", "4")  # fmt: skip
    assert code == 2 and "--memory-reset-every-segment" in err

    held_out = sorted(corpus.iterdir())[-3:]
    reports = {}
    for run_dir in (with_memory, baseline):
        report_path = tmp_path / f"{run_dir.name}.json"
        proc = subprocess.run(
            [sys.executable, "-m", "memformer_fast", "eval", str(run_dir),
             *map(str, held_out), "--json", str(report_path), "--no-progress",
             "--threads", "1", "--batch-size", "2"],
            capture_output=True, text=True,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        for label in ("memory carried", "memory reset", "all segments", "segment 1"):
            assert label in proc.stdout
        reports[run_dir.name] = json.loads(report_path.read_text())
    for report in reports.values():
        assert report["files"] == 3
        assert report["bytes"] == sum(p.stat().st_size for p in held_out)
        assert report["predicted_bytes"] == report["bytes"] - 3  # decoder: all but first bytes
        bpb = report["bits_per_byte"]
        assert 0 < bpb[CARRIED] < 16 and 0 < bpb[RESET] < 16
        assert sum(b["bytes"] for b in report["by_segment_in_file"]) == report["predicted_bytes"]
        assert report["parameters"] == reports["memory"]["parameters"]
    assert reports["memory"]["step"] == 3


def test_checkpoints_from_before_the_reset_options_resume() -> None:
    """A checkpoint whose settings lack the new fields resumes as a run without resets, and
    refuses to switch them on."""
    old = {name: value for name, value in vars(TrainSettings()).items() if "reset" not in name}
    ckpt = {"path": "old.pt", "settings": old}
    settings = resumed_settings(ckpt, {"steps": 5})
    assert settings.steps == 5 and not settings.reset_at_file_boundaries
    with pytest.raises(Exception, match="--reset-at-file-boundaries False, not True"):
        resumed_settings(ckpt, {"reset_at_file_boundaries": True})


def test_eval_errors_are_one_line(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "eval", str(tmp_path / "nowhere"), str(corpus))
    assert code == 2 and "no checkpoint" in err and err.count("\n") == 1
    run_dir = tmp_path / "run"
    assert (
        run(capsys, "train", str(corpus), "--out", str(run_dir), *TINY_CLI, "--steps", "1")[0] == 0
    )
    code, _, err = run(capsys, "eval", str(run_dir), str(tmp_path / "missing.txt"))
    assert code == 2 and "no such file" in err
    code, _, err = run(capsys, "eval", str(run_dir), str(corpus), "--batch-size", "0")
    assert code == 2 and "--batch-size must be >= 1, got 0" in err


# ------------------------------------------------------------- pipes, --json paths and signals


@pytest.fixture
def trained(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    run_dir = tmp_path / "run"
    code, _, err = run(capsys, "train", str(corpus), "--out", str(run_dir), *TINY_CLI,
                       "--steps", "1", "--threads", "1")  # fmt: skip
    assert code == 0, err
    return run_dir


def one_line(code: int, out: str, err: str, *fragments: str) -> None:
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    assert "eval:" not in out  # refused before the evaluation, not after it


def test_eval_json_path_is_checked_first_and_written_atomically(
    corpus: Path, tmp_path: Path, trained: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """``--json`` naming a folder, a path under a file or a read-only folder fails with one
    line before the evaluation, not a traceback after it. The report is written through a
    temporary file: a full disk leaves neither a partial report nor the temporary file."""
    text = str(sorted(corpus.iterdir())[-1])
    args = ["eval", str(trained), text, "--no-progress", "--threads", "1"]
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    cases = [(tmp_path, "is a folder: name a file"),
             (a_file / "report.json", f"{a_file} is a file, not a folder")]  # fmt: skip
    if not os.access(read_only, os.W_OK):  # (root writes anywhere)
        cases.append((read_only / "report.json", "cannot be written"))
    for where, says in cases:
        one_line(*run(capsys, *args, "--json", str(where)), says)
    assert a_file.read_text() == "x"

    report = tmp_path / "new" / "sub" / "report.json"
    code, _, err = run(capsys, *args, "--json", str(report))
    assert code == 0, err
    assert json.loads(report.read_text())["files"] == 1
    assert sorted(p.name for p in report.parent.iterdir()) == ["report.json"]

    def full_disk(path: Path, data: memoryview) -> None:
        path.write_bytes(bytes(data[:10]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(disk, "write_file", full_disk)
    again = tmp_path / "full" / "report.json"
    code, _, err = run(capsys, *args, "--json", str(again))
    assert code == 2 and "could not write --json" in err and "No space left on device" in err
    assert list(again.parent.iterdir()) == []


def test_eval_into_a_closed_pipe_still_writes_its_json(
    corpus: Path, tmp_path: Path, trained: Path
) -> None:
    """``eval ... | head -n 1`` ends without a BrokenPipeError traceback, and the ``--json``
    report is still written."""
    report = tmp_path / "report.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "memformer_fast", "eval", str(trained),
         *map(str, sorted(corpus.iterdir())[-3:]), "--json", str(report), "--no-progress",
         "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    assert b"eval:" in proc.stdout.readline()
    proc.stdout.close()  # what `head -n 1` does once it has its line
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0, err
    assert b"Traceback" not in err, err
    assert json.loads(report.read_text())["files"] == 3


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_during_eval_says_so(tmp_path: Path, trained: Path, sig: str) -> None:
    """Ctrl-C or SIGTERM during ``eval`` says so in the same words as ``train``'s, with status
    128 + the signal."""
    signum = getattr(signal, sig)
    big = tmp_path / "big.txt"
    big.write_bytes(b"".join(FILES) * 40)  # minutes of evaluation for this model
    proc = subprocess.Popen(
        [sys.executable, "-m", "memformer_fast", "eval", str(trained), str(big), "--no-progress",
         "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        assert b"eval:" in proc.stdout.readline()
        time.sleep(0.5)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum, err
    words = b"terminated (SIGTERM)" if sig == "SIGTERM" else b"interrupted"
    assert b"eval: " + words in err and b"Traceback" not in err, err
