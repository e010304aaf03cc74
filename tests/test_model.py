"""The model (docs/design.md, "The model"): shapes, masks, initialisation, state dicts (its
rollouts, generation and layers have test files of their own)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from testing_utils import count_checks, tiny_model

from memformer_fast import Memformer

ARCHS = ["encoder-decoder", "decoder"]


def tiny(arch: str, **overrides) -> Memformer:
    return tiny_model(arch, **overrides).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_shapes_and_memory_dtype(arch):
    model = tiny(arch)
    ids = torch.randint(0, 23, (4, 5))
    out = model(ids, labels=ids)
    assert out.logits is not None and out.logits.shape == (4, 5, 23)
    assert out.memory.shape == (4, 3, 16) and out.memory.dtype == torch.float32
    assert out.loss is not None and torch.isfinite(out.loss)
    torch.testing.assert_close(out.memory.norm(dim=-1), torch.ones(4, 3))
    assert model(ids[:, :3]).memory.shape == (4, 3, 16)  # a shorter segment is fine


def test_encoder_decoder_without_decoder_input_only_writes():
    model = tiny("encoder-decoder")
    out = model(torch.randint(0, 23, (2, 5)))
    assert out.logits is None and out.loss is None


def test_init_memory_and_initialisation_contract():
    model = tiny("decoder")
    m0 = model.init_memory(3)
    bias = model.writer.bias
    torch.testing.assert_close(m0, F.normalize(bias, dim=-1).expand(3, -1, -1))
    torch.testing.assert_close(bias.norm(dim=-1), torch.full((3,), model.config.bias_init_norm))
    assert 0 < model.config.bias_init_norm <= 0.1  # small: a large bias wipes the slots
    assert model.writer.gate is not None
    assert torch.all(model.writer.gate.bias == model.config.gate_bias_init)
    # the memory stays in memory_dtype even when the model runs in another dtype
    assert model.double().init_memory(1).dtype == torch.float32


@pytest.mark.parametrize("arch", ARCHS)
def test_padding_never_leaks_into_real_tokens_or_memory(arch):
    model = tiny(arch)
    ids = torch.randint(0, 23, (2, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    other = ids.clone()
    other[0, 3:] = (ids[0, 3:] + 7) % 23  # change only padded tokens
    dec = {"decoder_input_ids": ids} if arch == "encoder-decoder" else {}
    a = model(ids, attention_mask=mask, **dec)
    b = model(other, attention_mask=mask, **dec)
    torch.testing.assert_close(a.memory, b.memory)
    if arch == "decoder":
        torch.testing.assert_close(a.logits[0, :3], b.logits[0, :3])
    else:
        torch.testing.assert_close(a.logits, b.logits)
    assert torch.isfinite(a.logits).all()


def test_all_padding_segment_keeps_the_memory():
    model = tiny("decoder")
    memory = model(torch.randint(0, 23, (2, 5))).memory
    mask = torch.tensor([[0] * 5, [1] * 5])
    out = model(torch.randint(0, 23, (2, 5)), memory=memory, attention_mask=mask)
    assert torch.equal(out.memory[0], memory[0])
    assert not torch.equal(out.memory[1], memory[1])


@pytest.mark.parametrize("arch", ARCHS)
def test_state_dict_round_trip_across_backends(arch):
    model = tiny(arch)
    clone = tiny(arch, backend="auto")
    with torch.no_grad():
        for p in clone.parameters():
            p.add_(1.0)
    clone.load_state_dict(model.state_dict())
    ids = torch.randint(0, 23, (2, 15))
    torch.testing.assert_close(model.sequence_loss(ids)[0], clone.sequence_loss(ids)[0])
    assert set(model.state_dict()) == set(clone.state_dict())


@pytest.mark.parametrize("arch", ARCHS)
def test_odd_head_dim(arch):
    """An odd head dimension works: rotary leaves the last feature unrotated."""
    model = tiny(arch, d_model=30, n_heads=2)
    ids = torch.randint(0, 23, (2, 12))
    loss, memory = model.sequence_loss(ids)
    assert torch.isfinite(loss) and memory.shape == (2, 3, 30)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["forward", "sequence_loss", "generate", "stream"])
def test_public_methods_validate_each_argument_once(
    monkeypatch: pytest.MonkeyPatch, arch: str, method: str
) -> None:
    """One public call checks each argument once, and the tensors it builds (the blocks' and the
    writer's inputs, every segment's) not at all."""
    model = tiny(arch)
    L = model.config.segment_length
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 3 * L), generator=g)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, -2:] = False
    memory, flags = model.init_memory(2).detach(), torch.tensor([True, False])
    calls = {
        "forward": lambda: model(ids[:, :L], memory, mask[:, :L], labels=ids[:, :L], reset=flags),
        "sequence_loss": lambda: model.sequence_loss(
            ids, memory, mask, ids, resets=torch.zeros(2, 3, dtype=torch.bool)
        ),
        "generate": lambda: model.generate(ids[:, : L + 2], L, memory, reset=flags),
        "stream": lambda: list(model.stream(ids[:, : L + 2], L, memory, reset=flags)),
    }
    arguments = {
        "forward": [("check_ids", "input_ids"), ("check_mask", "attention_mask"),
                    ("mask_format", "attention_mask"), ("check_resets", "reset"),
                    ("check_memory", ""), ("check_labels", "")]
                   + [("check_ids", "decoder_input_ids")] * (arch == "encoder-decoder"),
        "sequence_loss": [("check_ids", "input_ids"), ("mask_format", "attention_mask"),
                          ("check_resets", "resets"), ("check_memory", ""),
                          ("check_labels", "")],
        "generate": [("check_ids", "prompt_ids"), ("check_resets", "reset"),
                     ("check_memory", "")],
    }  # fmt: skip
    counts = count_checks(monkeypatch)
    calls[method]()
    assert counts == dict.fromkeys(arguments.get(method, arguments["generate"]), 1), counts
