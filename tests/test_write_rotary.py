"""``MemformerConfig.write_rotary``: the writer's token keys rotated by their distance from the
segment's end, so slots can attend by recency (``MemoryWriter._rotate_by_recency``)."""

from __future__ import annotations

import pytest
import torch
from testing_utils import assert_mrbp_equals_bptt, make_model

from memformer_fast import MemformerConfig, MemoryWriter


def _writer(rotary: bool) -> MemoryWriter:
    torch.manual_seed(0)
    return MemoryWriter(16, 2, 3, backend="reference", rotary=rotary).double()


def test_positions_count_back_from_the_last_real_token_wherever_the_padding_is():
    writer = _writer(True)
    memory, x = writer.initial_memory(2, torch.float64), torch.randn(2, 5, 16).double()
    plain = writer(memory, x)
    pad = torch.randn(2, 3, 16).double()
    for padded, mask in (
        (torch.cat([pad, x], 1), torch.arange(8) >= 3),  # left padding
        (torch.cat([x, pad], 1), torch.arange(8) < 5),  # right padding
    ):
        torch.testing.assert_close(writer(memory, padded, mask.expand(2, 8)), plain)


def test_order_matters_only_with_rotary_positions():
    """Without positions the write is a function of the set of tokens; with them, reversing the
    segment changes what is written."""
    x = torch.randn(2, 6, 16).double()
    for rotary in (False, True):
        writer = _writer(rotary)
        memory = writer.initial_memory(2, torch.float64)
        same = torch.allclose(writer(memory, x), writer(memory, x.flip(1)))
        assert same is (not rotary)


def test_rotary_writer_adds_no_parameters_and_loads_plain_state_dicts():
    plain, rotary = _writer(False), _writer(True)
    assert plain.state_dict().keys() == rotary.state_dict().keys()
    rotary.load_state_dict(plain.state_dict())


@pytest.mark.parametrize("arch", ["encoder-decoder", "decoder"])
def test_mrbp_equals_bptt_with_a_rotary_writer(arch: str) -> None:
    model = make_model(
        arch, vocab_size=31, n_memory_slots=4, segment_length=6, dtype=torch.float64,
        write_rotary=True,
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 31, (3, 6 * 5 + 2), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 13:] = 0  # a sequence that ends mid-segment
    assert_mrbp_equals_bptt(model, ids, tol=1e-12, attention_mask=mask, labels=ids)


def test_write_rotary_must_be_a_bool():
    assert MemformerConfig(vocab_size=8, write_rotary=True).write_rotary
    with pytest.raises(ValueError, match=r"MemformerConfig.write_rotary must be a bool, got 1"):
        MemformerConfig(vocab_size=8, write_rotary=1)  # type: ignore[arg-type]
