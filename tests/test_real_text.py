"""benchmarks/real_text.py: its Transformer-XL baseline, its training stream and its smoke run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import real_text  # noqa: E402

CFG = dict(real_text.SMOKE, segment=8)


def test_the_xl_cache_sees_exactly_the_previous_segment() -> None:
    """With the cache of the previous segment, the XL step equals the same blocks run on the two
    segments at once (memory reset); with the cache dropped (a new document), the segment alone."""
    torch.manual_seed(0)
    xl = real_text.make_model(CFG, "xl").eval()
    window = real_text.make_model(CFG, "window").eval()
    window.load_state_dict(xl.state_dict())
    ids = torch.randint(1, 256, (3, 16))
    with torch.no_grad():
        first, cache = real_text.xl_segment(xl, ids[:, :8], None, torch.ones(3, dtype=torch.bool))
        keep = torch.tensor([True, False, True])
        second, _ = real_text.xl_segment(xl, ids[:, 8:], cache, keep)
        both = window(ids).logits
        alone = xl(ids[:, 8:]).logits
    torch.testing.assert_close(first, both[:, :8], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(second[keep], both[keep, 8:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(second[1], alone[1], atol=1e-5, rtol=1e-5)


def test_the_training_stream_starts_documents_on_segments_with_resets() -> None:
    docs = [b"abcdefghij", b"xyz", b"0123456789abcdefghijk"]
    ids, labels, resets = real_text.training_stream(docs, rows=1, segment=4, n_segments=10)
    assert ids.shape == labels.shape == (1, 40) and resets.shape == (1, 10)
    # documents start at segments 0, 4 and 6 (aligned to two segments), padded with zeros
    assert resets[0].nonzero().flatten().tolist() == [0, 4, 6]
    assert bytes(ids[0, :10].tolist()) == docs[0] and ids[0, 10:16].eq(0).all()
    assert labels[0, 16] == -100 and labels[0, 17] == ord("y") and labels[0, 19] == -100
    assert labels[0, 24] == -100 and labels[0, 25] == ord("1")


@pytest.mark.slow
def test_the_smoke_run_reports_every_model_on_both_texts(tmp_path: Path) -> None:
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/real_text.py"), "--smoke", "--out", str(tmp_path)],
        check=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
        capture_output=True,
    )
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["runs"]) == {f"{t}_{m}" for t in real_text.TEXTS for m in real_text.MODELS}
    params = {r["parameters"] for r in results["runs"].values()}
    assert len(params) == 1  # the same parameter count for every model
    for run in results["runs"].values():
        assert 0 < run["eval"]["bits_per_byte"] < 9
        assert 0 <= run["train"]["clipped_share"] <= 1 and run["train"]["grad_norm_median"] > 0
        assert [b["segments"] for b in run["eval"]["by_segment"]][3] == "17-64"
    assert (tmp_path / "results.md").exists() and (tmp_path / "bpb_by_segment.png").exists()


def test_memory_dropout_adds_resets_at_the_share_asked() -> None:
    starts = torch.zeros(64, 100, dtype=torch.bool)
    starts[:, ::10] = True
    g = torch.Generator().manual_seed(0)
    assert torch.equal(real_text.drop_memory(starts, 0.0, g), starts)
    dropped = real_text.drop_memory(starts, 0.5, g)
    assert dropped[starts].all()  # document starts stay resets
    assert 0.45 < dropped[~starts].float().mean() < 0.55
