"""The repository's top-level ``kernels/`` folder never shadows another distribution's ``kernels``,
and installs as ``memformer_fast.kernels``.

Run from the repository root, Python puts the root first on ``sys.path``: a regular package there
named ``kernels`` was imported by ``transformers`` (>= 5.25) in place of its dependency, Hugging
Face's ``kernels``. ``kernels/`` has no ``__init__.py``, so it is at most a namespace-package
portion, which the import system passes over for the installed distribution; the package's
``__init__`` is ``memformer_fast/kernels/__init__.py`` (``setup.py`` and that file say how the
modules are found in a wheel and in an editable install).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KERNEL_MODULES = {"gated_update", "memory_read", "memory_write", "utils"}


def _run(script: str, cwd: Path, **env: str) -> dict:
    """``script`` in a fresh interpreter started in ``cwd`` (``python -c``: ``cwd`` is first on
    ``sys.path``, as for a user in that folder); the JSON of its last line."""
    import os

    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_only_memformer_fast_is_a_regular_package_at_the_root() -> None:
    """A folder with an ``__init__.py`` at the root would be found, from there, before any
    installed package of its name."""
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert packages == {"memformer_fast"}
    assert {p.stem for p in (ROOT / "kernels").glob("*.py")} == KERNEL_MODULES


_HF_FROM_THE_ROOT = """
    import importlib.metadata, json, sys, tempfile
    from pathlib import Path

    import torch

    root = Path.cwd().resolve()
    assert Path(sys.path[0] or ".").resolve() == root, sys.path[:2]
    import kernels

    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:  # then ours may be a namespace, never a package
        dist = None
        assert getattr(kernels, "__file__", None) is None, f"`import kernels` found {kernels}"
    else:  # the distribution's own package, not the repository's folder
        found, own = Path(kernels.__file__).resolve(), dist.locate_file("kernels/__init__.py")
        assert found == Path(own), f"`import kernels` found {found}, not {own}"
    import transformers
    from transformers import AutoModelForCausalLM

    if dist is not None:
        import transformers.integrations.hub_kernels  # noqa: F401  (`from kernels import ...`)
    from memformer_fast.hf import MemformerForCausalLM, MemformerHFConfig

    config = MemformerHFConfig(
        vocab_size=23, d_model=16, n_heads=2, d_ff=32, n_encoder_layers=1, n_decoder_layers=1,
        n_memory_slots=4, segment_length=5, architecture="decoder",
    )
    torch.manual_seed(0)
    model = MemformerForCausalLM(config).eval()
    ids = torch.randint(0, 23, (2, 12))
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        loaded = AutoModelForCausalLM.from_pretrained(tmp).eval()
    assert type(loaded) is MemformerForCausalLM, type(loaded)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    print(json.dumps({
        "kernels": getattr(kernels, "__file__", None),
        "kernels_version": dist and dist.version,
        "transformers": transformers.__version__,
    }))
"""


def test_transformers_loads_memformer_from_the_repository_root() -> None:
    """``transformers`` (and its ``kernels``) imported with the
    repository root first on ``sys.path``, then a ``MemformerForCausalLM`` saved and loaded back
    through ``AutoModelForCausalLM``."""
    pytest.importorskip("transformers")
    found = _run(_HF_FROM_THE_ROOT, ROOT)
    if found["kernels"] is not None:  # (a venv inside the checkout may hold the distribution)
        assert ROOT / "kernels" not in Path(found["kernels"]).resolve().parents, found


def test_the_package_imports_its_kernels_from_the_repository_root() -> None:
    """``memformer_fast.kernels`` from the checkout (``__path__`` reaches into ``kernels/``)."""
    pytest.importorskip("triton")
    found = _run(
        """
        import json
        import memformer_fast.kernels as k
        import memformer_fast.kernels.memory_read as m
        ops = len(k.LAUNCHED_KERNELS)
        print(json.dumps({"path": k.__path__, "module": m.__file__, "ops": ops}))
        """,
        ROOT,
        TRITON_INTERPRET="1",
    )
    assert found["module"] == str(ROOT / "kernels" / "memory_read.py")
    assert found["path"] == [str(ROOT / "memformer_fast" / "kernels"), str(ROOT / "kernels")]
    assert found["ops"] == 6


def test_a_wheel_holds_the_kernels_in_the_package(tmp_path: Path) -> None:
    """``build_py`` (what a wheel holds) puts ``kernels/*.py`` beside the package's ``__init__``,
    and nothing at the top level; imported from there, the package does not reach outside."""
    pytest.importorskip("triton")
    lib = tmp_path / "lib"
    build = [sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)]
    build += ["build_py", "--build-lib", str(lib)]  # nothing written into the checkout
    run = subprocess.run(build, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    assert {p.name for p in lib.iterdir()} == {"memformer_fast"}
    installed = {p.stem for p in (lib / "memformer_fast" / "kernels").glob("*.py")}
    assert installed == KERNEL_MODULES | {"__init__"}
    found = _run(
        """
        import json
        import memformer_fast.kernels as k
        import memformer_fast.kernels.memory_read as m
        print(json.dumps({"path": k.__path__, "module": m.__file__}))
        """,
        tmp_path,
        PYTHONPATH=str(lib),
        TRITON_INTERPRET="1",
    )
    assert found == {
        "path": [str(lib / "memformer_fast" / "kernels")],
        "module": str(lib / "memformer_fast" / "kernels" / "memory_read.py"),
    }
