"""``memformer_fast.app.recall``: the single-key recall task, its curriculum and accuracy;
associative recall (MQAR) across segments and the accuracy of several queries at once."""

from __future__ import annotations

import pytest
import torch

from memformer_fast import Memformer, MemformerConfig
from memformer_fast.app.recall import (
    FIRST_KEY,
    MARKER_TOKEN,
    QUERY_TOKEN,
    AssociativeRecallTask,
    RecallTask,
    curriculum,
    query_accuracy,
    recall_accuracy,
)
from memformer_fast.model import IGNORE_INDEX


def small_model(
    task: RecallTask | AssociativeRecallTask, architecture: str, d_model: int = 16
) -> Memformer:
    """A model of one layer a side, width ``d_model`` and 4 slots for ``task``'s tokens and
    segments, on the reference backend."""
    layers = dict(n_decoder_layers=1) if architecture == "decoder" else dict(
        n_encoder_layers=1, n_decoder_layers=1)  # fmt: skip
    cfg = MemformerConfig(
        vocab_size=task.vocab_size, d_model=d_model, n_heads=2, d_ff=2 * d_model,
        n_memory_slots=4, segment_length=task.segment_length, architecture=architecture,
        backend="reference", **layers,
    )  # fmt: skip
    return Memformer(cfg)


# ------------------------------------------------------------------- the single-key task


def test_recall_task_layout() -> None:
    task = RecallTask(segment_length=8, num_keys=5, num_distractors=7)
    ids, labels, keys = task.sample(64, 3, key_copies=2, generator=torch.Generator().manual_seed(0))
    assert ids.shape == labels.shape == (64, 24) and keys.shape == (64,)
    assert task.vocab_size == FIRST_KEY + 12 and task.chance == pytest.approx(0.2)
    # key_copies marker-key pairs in the first segment, no marker anywhere else.
    is_marker = ids == MARKER_TOKEN
    assert (is_marker[:, :8].sum(1) == 2).all() and not is_marker[:, 8:].any()
    after = torch.roll(is_marker[:, :8], 1, dims=1)
    assert (ids[:, :8][after].view(64, 2) == keys[:, None]).all()
    # Other positions hold any content token, keys included: only the marker tells the key.
    assert ((ids[:, 8:-2] >= FIRST_KEY) & (ids[:, 8:-2] < FIRST_KEY + 5)).any()
    assert (ids[:, -2] == QUERY_TOKEN).all() and (ids[:, -1] == keys).all()
    assert (labels[:, :-1] == -100).all() and (labels[:, -1] == keys).all()
    assert ids.min() >= 1 and ids.max() < task.vocab_size  # token 0 is BOS, never in a sequence
    single, _, single_keys = task.sample(256, 2, generator=torch.Generator().manual_seed(1))
    first = single[:, :8]
    assert ((first == MARKER_TOKEN).sum(1) == 1).all()
    positions = (first == MARKER_TOKEN).int().argmax(1)
    assert (first[torch.arange(256), positions + 1] == single_keys).all()
    assert len(positions.unique()) == 7  # every place a marker-key pair fits
    again, _, _ = task.sample(64, 3, key_copies=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ids, again)
    with pytest.raises(ValueError, match="num_segments"):
        task.sample(2, 1)
    with pytest.raises(ValueError, match="key_copies"):
        task.sample(2, 2, key_copies=5)


def test_curriculum_doubles_the_longest_rollout_and_mixes_lengths() -> None:
    stages = curriculum(16, 10)
    assert [(s.label, s.key_copies, s.steps) for s in stages] == [
        ("T=2", 1, 10), ("T=2-4", 1, 10), ("T=2-8", 1, 10), ("T=2-16", 1, 20),
    ]  # fmt: skip
    assert [(s.label, s.key_copies) for s in curriculum(6, 10, key_copies=4)] == [
        ("T=2", 4), ("T=2", 1), ("T=2-4", 1), ("T=2-6", 1),
    ]  # fmt: skip
    assert [(s.num_segments, s.steps) for s in curriculum(2, 10)] == [(2, 20)]
    # Every length of a stage's range is drawn, odd ones included.
    gen = torch.Generator().manual_seed(0)
    assert {stages[-1].draw(gen) for _ in range(400)} == set(range(2, 17))


def test_recall_accuracy_matches_a_manual_evaluation() -> None:
    torch.manual_seed(0)
    task = RecallTask(segment_length=8)
    model = small_model(task, "decoder", d_model=32)
    ids, _, keys = task.sample(40, 3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        memory, reset = None, None
        for segment in ids.split(8, dim=1):
            out = model(segment, memory=memory)
            memory = out.memory
            reset = model(segment).logits  # fresh memory at every segment
    expected = (out.logits[:, -2].argmax(-1) == keys).float().mean().item()
    expected_reset = (reset[:, -2].argmax(-1) == keys).float().mean().item()
    assert recall_accuracy(model, ids, keys, batch_size=16) == pytest.approx(expected)
    assert recall_accuracy(model, ids, keys, reset_memory=True) == pytest.approx(expected_reset)
    assert model.training  # restored


def test_recall_accuracy_of_the_encoder_decoder_decodes_the_last_segment() -> None:
    """The encoder-decoder answers while decoding the last segment from the one before it: the
    logits at the last position (whose decoder input is the query) predict the key."""
    torch.manual_seed(0)
    task = RecallTask(segment_length=8)
    model = small_model(task, "encoder-decoder").eval()
    ids, _, keys = task.sample(24, 4, generator=torch.Generator().manual_seed(1))
    segments = ids.split(8, dim=1)
    decoder_inputs = torch.cat([torch.zeros(24, 1, dtype=torch.long), segments[-1][:, :-1]], 1)
    with torch.no_grad():
        memory = None
        for segment in segments[:2]:
            memory = model(segment, memory=memory).memory
        logits = model(segments[2], memory=memory, decoder_input_ids=decoder_inputs).logits
        reset = model(segments[2], decoder_input_ids=decoder_inputs).logits
    # The decoder's input at the last position is the query; its logits there predict the key.
    expected = (logits[:, -1].argmax(-1) == keys).float().mean().item()
    expected_reset = (reset[:, -1].argmax(-1) == keys).float().mean().item()
    assert recall_accuracy(model, ids, keys, batch_size=10) == pytest.approx(expected)
    assert recall_accuracy(model, ids, keys, reset_memory=True) == pytest.approx(expected_reset)


# ------------------------------------------------------------------- associative recall


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
    model = small_model(task, architecture).eval()
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
    model = small_model(task, "decoder")
    ids, labels, keys = task.sample(40, 3, generator=torch.Generator().manual_seed(2))
    assert recall_accuracy(model, ids, keys) == query_accuracy(model, ids, labels)
