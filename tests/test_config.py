"""MemformerConfig (``memformer_fast.config``): serialisation and the messages of bad fields."""

from __future__ import annotations

import json

import pytest
import torch

from memformer_fast import MemformerConfig


def test_to_dict_is_json_and_round_trips() -> None:
    config = MemformerConfig(vocab_size=50, d_model=32, n_heads=2, memory_dtype=torch.float64)
    d = config.to_dict()
    assert d["memory_dtype"] == "float64"
    assert MemformerConfig.from_dict(json.loads(json.dumps(d))) == config


def test_from_dict_fills_fields_an_older_dict_lacks() -> None:
    d = MemformerConfig(vocab_size=50, d_model=32, n_heads=2).to_dict()
    del d["embedding_init_std"], d["tie_embeddings"]
    config = MemformerConfig.from_dict(d)
    assert config.embedding_init_std == 1.0 and config.tie_embeddings is False


def test_from_dict_names_what_is_wrong() -> None:
    d = MemformerConfig(vocab_size=50).to_dict()
    with pytest.raises(ValueError, match=r"not MemformerConfig fields: \['colour'\]"):
        MemformerConfig.from_dict({**d, "colour": 1})
    with pytest.raises(ValueError, match=r"MemformerConfig\.memory_dtype must be a torch\.dtype"):
        MemformerConfig.from_dict({**d, "memory_dtype": "float33"})
    with pytest.raises(TypeError, match="d must be a dict"):
        MemformerConfig.from_dict([("vocab_size", 5)])  # type: ignore[arg-type]
