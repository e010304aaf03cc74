"""Every ```python block of README.md and docs/hf.md runs, so no snippet can go stale.

A file's blocks run in order in one namespace, as a reader pastes them one after the other (the
resets block uses the model of the block before it), in a temporary working folder (the Hugging
Face blocks write ``runs/hf``). The blocks are written at sizes that run in seconds on a CPU; none
is skipped (a block that needs ``transformers`` is skipped only where it is not installed, as the
rest of the suite's Hugging Face tests are). After each block, what its comments claim (a shape,
such as ``generate``'s new tokens only) is checked too.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(name: str) -> list[tuple[int, str]]:
    """``(line of the opening fence, code)`` of every ```python block of ``ROOT / name``."""
    text = (ROOT / name).read_text()
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in BLOCK.finditer(text)]


# (file, index of the block) -> (an expression, its value after the block ran): what the block's
# comments say.
CLAIMS: dict[tuple[str, int], tuple[str, object]] = {
    ("README.md", 0): ("tuple(tokens.shape)", (8, 50)),  # generate returns only the new tokens
    ("README.md", 1): ("tuple(tokens.shape)", (8, 20)),
    ("README.md", 2): ("tuple(m.shape)", (2, 16, 128)),
    ("README.md", 3): ("(result.num_segments, tuple(result.memory.shape))", (8, (4, 8, 64))),
    ("README.md", 4): ("tuple(out.shape)", (1, 150)),  # the HF generate(): prompt + new tokens
    ("docs/hf.md", 0): ("tuple(out.shape)", (1, 150)),
}
# How many blocks each file has: a broken pattern must not pass by finding none.
EXPECTED_BLOCKS = {"README.md": 5, "docs/hf.md": 1}


@pytest.mark.parametrize("name", sorted(EXPECTED_BLOCKS))
def test_every_python_block_runs(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: object
) -> None:
    blocks = python_blocks(name)
    assert len(blocks) == EXPECTED_BLOCKS[name], [line for line, _ in blocks]
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict[str, Any] = {"__name__": f"docs_snippet_{Path(name).stem}"}
    for index, (line, code) in enumerate(blocks):
        if "memformer_fast.hf" in code:
            pytest.importorskip("transformers")
        # The file name and line in the traceback point at the block in the document.
        exec(compile("\n" * line + code, f"{name}", "exec"), namespace)
        expression, expected = CLAIMS[name, index]
        assert eval(expression, namespace) == expected, (name, line, expression)
