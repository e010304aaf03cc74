"""Model-level drop-in check: a tiny Memformer with ``backend="triton"`` (CUDA, or the interpreter
on CPU) against ``backend="reference"`` sharing one state dict: the same loss and gradients of
every parameter (docs/design.md, "Guarantees"), for both architectures, through a rollout of
several segments (so the memory recurrence, the write's token mask and the gated update are all on
the path)."""

from __future__ import annotations

import os

import pytest
import torch
from testing_utils import relative_error, tiny_config, tiny_model

from memformer_fast import Memformer

pytestmark = pytest.mark.interpreter

CUDA = torch.cuda.is_available()
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@pytest.mark.parametrize("architecture", ["encoder-decoder", "decoder"])
def test_triton_backend_matches_reference(architecture: str) -> None:
    if not (CUDA or INTERPRETER):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    device = "cuda" if CUDA else "cpu"
    common = dict(
        vocab_size=50,
        d_model=32,
        d_ff=64,
        n_encoder_layers=1,
        n_decoder_layers=1,
        n_memory_slots=16,
        segment_length=8,
    )
    reference = tiny_model(architecture, **common).to(device)  # seeds 0
    triton = Memformer(tiny_config(architecture, backend="triton", **common)).to(device)
    triton.load_state_dict(reference.state_dict())

    ids = torch.randint(0, 50, (2, 16), device=device)  # two segments of 8 tokens
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 13:] = False  # padding at the end of the second segment of one sequence
    losses = {}
    for name, model in (("reference", reference), ("triton", triton)):
        loss, _ = model.sequence_loss(ids, attention_mask=mask)
        loss.backward()
        losses[name] = loss.detach()
    assert relative_error(losses["triton"], losses["reference"]) < 1e-4
    ref_params = dict(reference.named_parameters())
    for name, p in triton.named_parameters():
        expected = ref_params[name].grad
        if expected is None:
            assert p.grad is None or p.grad.abs().max() == 0, name
            continue
        assert p.grad is not None, name
        if expected.norm() > 0:
            assert relative_error(p.grad, expected) < 1e-4, name
