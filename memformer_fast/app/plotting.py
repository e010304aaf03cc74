"""The demo's learning curves as a PNG (matplotlib, imported only when a plot is drawn)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from .recall import Stage


def plot_curves(
    curve: dict[str, list[float]], chance: float, stages: Sequence[Stage], path: Path
) -> Path:
    """Training loss and held-out-probe accuracy against steps, curriculum stages shaded.

    ``curve``: ``"loss"`` per step, ``"eval_step"`` / ``"eval_acc"`` per evaluation,
    ``"stage_start"`` (the step each of ``stages`` starts at); ``chance``: the guessing level.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    steps = range(1, len(curve["loss"]) + 1)
    ax_loss.plot(steps, curve["loss"], lw=0.6, alpha=0.4, color="C0")
    window = 20
    if len(curve["loss"]) >= window:
        smooth = torch.tensor(curve["loss"]).unfold(0, window, 1).mean(1).tolist()
        ax_loss.plot(range(window, len(curve["loss"]) + 1), smooth, color="C0", label="loss")
    ax_loss.set(xlabel="step", ylabel="cross-entropy of the answer", yscale="log")
    ax_loss.set_title("MRBP training loss")
    ax_acc.plot(curve["eval_step"], curve["eval_acc"], "o-", ms=3, label="with memory")
    ax_acc.axhline(chance, ls="--", color="gray", label="chance")
    ax_acc.set(xlabel="step", ylabel="recall accuracy", ylim=(0, 1.02))
    ax_acc.set_title("Recall on held-out probes (current rollout length)")
    for ax in (ax_loss, ax_acc):
        for i, (start, stage) in enumerate(zip(curve["stage_start"], stages)):
            if i % 2:
                ax.axvspan(start, start + stage.steps, color="gray", alpha=0.08, lw=0)
            label = stage.label + (f"\n×{stage.key_copies}" if stage.key_copies > 1 else "")
            ax.text(
                start + 2, 0.97, label, transform=ax.get_xaxis_transform(), fontsize=7, va="top"
            )
    ax_acc.legend(loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
