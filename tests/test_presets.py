"""The named model sizes (``memformer_fast.presets``)."""

from __future__ import annotations

import pytest

from memformer_fast import MemformerConfig
from memformer_fast.presets import PRESETS, preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_a_valid_config(name: str) -> None:
    fields = preset(name)
    fields.setdefault("vocab_size", 256)
    fields.setdefault("d_ff", 4 * fields["d_model"])
    MemformerConfig(**fields)


def test_preset_is_a_copy_and_names_a_bad_name() -> None:
    preset("tiny")["d_model"] = 999
    assert PRESETS["tiny"]["d_model"] == 16
    assert preset("tiny", d_model=8)["d_model"] == 8
    with pytest.raises(ValueError, match="name must be one of"):
        preset("huge")
