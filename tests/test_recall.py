"""``memformer_fast.app.recall``: associative recall (MQAR) across segments and the accuracy of
several queries at once (the single-key task and its accuracy are in ``test_cli.py``)."""

from __future__ import annotations

import pytest
import torch

from memformer_fast import Memformer, MemformerConfig
from memformer_fast.app.recall import (
    FIRST_KEY,
    AssociativeRecallTask,
    RecallTask,
    query_accuracy,
    recall_accuracy,
)
from memformer_fast.model import IGNORE_INDEX


@pytest.mark.parametrize(("pairs", "queries", "segments"), [(3, 1, 6), (3, 3, 2), (16, 8, 4)])
def test_associative_recall_asks_values_written_at_the_start(
    pairs: int, queries: int, segments: int
) -> None:
    task = AssociativeRecallTask(num_pairs=pairs, num_queries=queries, num_keys=max(8, 2 * pairs),
                                 num_values=max(8, 2 * pairs))  # fmt: skip
    L, B = task.segment_length, 50
    ids, labels, asked = task.sample(B, segments, generator=torch.Generator().manual_seed(0))
    assert ids.shape == labels.shape == (B, segments * L) and asked.shape == (B, queries)
    keys, values = ids[:, 0 : 2 * pairs : 2], ids[:, 1 : 2 * pairs : 2]
    assert ((keys >= FIRST_KEY) & (keys < task.first_value)).all()
    assert ((values >= task.first_value) & (values < task.first_distractor)).all()
    assert all(len(set(row.tolist())) == pairs for row in keys)  # distinct keys
    query_keys = ids[:, -2 * queries :: 2]
    # Every queried key is one of the row's pairs, asked once, and its label is the pair's value.
    for row in range(B):
        pair = dict(zip(keys[row].tolist(), values[row].tolist()))
        assert len(set(query_keys[row].tolist())) == queries
        assert [pair[k] for k in query_keys[row].tolist()] == asked[row].tolist()
    scored = labels != IGNORE_INDEX
    assert scored.sum(1).eq(queries).all() and scored[:, -2 * queries + 1 :: 2].all()
    assert torch.equal(labels[scored].view(B, queries), asked)
    assert torch.equal(ids[scored], labels[scored])
    # Everything else is a distractor: a key or a value appears only in its pair or its query.
    rest = torch.ones_like(ids, dtype=torch.bool)
    rest[:, : 2 * pairs] = False
    rest[:, -2 * queries :] = False
    assert (ids[rest] >= task.first_distractor).all() and (ids < task.vocab_size).all()


def test_associative_recall_refuses_what_cannot_be_asked() -> None:
    with pytest.raises(ValueError, match=r"num_pairs must be in \[1, num_keys=8\].*got 9"):
        AssociativeRecallTask(num_pairs=9)
    with pytest.raises(ValueError, match=r"num_queries must be in \[1, 3\].*got 4"):
        AssociativeRecallTask(num_pairs=3, num_queries=4)
    with pytest.raises(ValueError, match="num_values >= 2"):
        AssociativeRecallTask(num_values=1)
    task = AssociativeRecallTask(num_pairs=16, num_keys=16)
    assert task.pair_segments == 2
    with pytest.raises(ValueError, match=r"num_segments must be >= 3 .*got 2"):
        task.sample(1, 2)


@pytest.mark.parametrize("architecture", ["decoder", "encoder-decoder"])
def test_query_accuracy_scores_every_query_of_the_last_segment(architecture: str) -> None:
    """Each asked value is predicted where the model predicts that token: the decoder at the key
    before it, the encoder-decoder at the value itself (its decoder input there is the key)."""
    torch.manual_seed(0)
    task = AssociativeRecallTask(segment_length=8, num_pairs=3, num_queries=3)
    layers = dict(n_decoder_layers=1) if architecture == "decoder" else dict(
        n_encoder_layers=1, n_decoder_layers=1)  # fmt: skip
    cfg = MemformerConfig(
        vocab_size=task.vocab_size, d_model=16, n_heads=2, d_ff=32, n_memory_slots=4,
        segment_length=8, architecture=architecture, backend="reference", **layers,
    )  # fmt: skip
    model = Memformer(cfg).eval()
    ids, labels, asked = task.sample(30, 4, generator=torch.Generator().manual_seed(1))
    segments = ids.split(8, dim=1)
    with torch.no_grad():
        memory = None
        if architecture == "decoder":
            for segment in segments[:-1]:
                memory = model(segment, memory=memory).memory
            logits = model(segments[-1], memory=memory).logits[:, -6::2]  # at the keys
        else:
            for segment in segments[:-2]:
                memory = model(segment, memory=memory).memory
            bos = torch.zeros(30, 1, dtype=torch.long)
            decoder_inputs = torch.cat([bos, segments[-1][:, :-1]], 1)
            logits = model(segments[-2], memory=memory, decoder_input_ids=decoder_inputs).logits
            logits = logits[:, -5::2]  # at the values
    predicted = logits.argmax(-1)  # [30, 3]
    expected = (predicted == asked).float().mean().item()
    assert query_accuracy(model, ids, labels, batch_size=7) == pytest.approx(expected)
    # Labels set to the model's own predictions score 1 only where they are read at the right
    # place (a random model's accuracy alone could be 0 however it is aligned).
    own = labels.clone()
    own[labels != IGNORE_INDEX] = predicted.flatten()
    assert query_accuracy(model, ids, own, batch_size=7) == 1.0


def test_recall_accuracy_is_the_query_accuracy_of_the_key() -> None:
    torch.manual_seed(0)
    task = RecallTask(segment_length=8)
    cfg = MemformerConfig(
        vocab_size=task.vocab_size, d_model=16, n_heads=2, d_ff=32, n_decoder_layers=1,
        n_memory_slots=4, segment_length=8, architecture="decoder", backend="reference",
    )  # fmt: skip
    model = Memformer(cfg)
    ids, labels, keys = task.sample(40, 3, generator=torch.Generator().manual_seed(2))
    assert recall_accuracy(model, ids, keys) == query_accuracy(model, ids, labels)
