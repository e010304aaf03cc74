"""The segment step of :func:`memformer_fast.mrbp.backward` through ``torch.compile``.

On a GPU at the paper's sizes a fused kernel does about a microsecond of work, so an eager step
is bound by the host dispatching about a thousand operators per segment. Compiled, a segment is
two graphs with ``fullgraph=True``: the critical path (embedding, blocks, memory writer, and the
last norm when the decoder needs the context) and the decoder with its summed loss. The replay's
backward runs through the same graphs (AOTAutograd's backward graphs).

With ``backend="triton"`` on CUDA the fused operations are ``torch.library.triton_op``\\ s
(:mod:`memformer_fast.ops`): AOTAutograd decomposes each into its Triton kernel launches, forward
and backward, so inductor's generated code calls the kernels directly (no Python launcher, no
custom-op dispatch per call) and ``mode="reduce-overhead"`` captures them in its CUDA graphs. On
the CPU, interpreted kernels stay behind opaque ops (the reference backend is plain PyTorch).

Dropout stays exact: each part still runs inside :func:`memformer_fast.randomness.seeded`,
entered by :func:`~memformer_fast.rollout.run_segment` outside the graphs, and the mask is drawn
by an opaque custom op that reads the generator of that call at run time; so a compiled MRBP
draws the very masks BPTT draws.

Compilation happens once per distinct situation, not per segment nor per call: Dynamo caches the
graphs (keyed by guards on shapes, grad mode and which optional inputs are given), so the no-grad
critical path, the replay, a ragged last segment and a padded rollout each compile once, and later
calls reuse them. Inputs that would multiply the situations without changing the work are made
uniform: every step gets a reset column (all False where no row resets: a ``torch.where`` that
changes nothing), and every replayed memory requires grad (the first segment's may not). So a
training loop meets a handful of graphs, whatever mix of padding, resets and carried memories its
rollouts bring. Beyond :data:`RECOMPILE_LIMIT` graphs per model (batch sizes, lengths, modes), a
step runs eagerly, with the same result and one warning, instead of failing as ``fullgraph=True``
makes Dynamo do at its default limit of 8.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from . import rollout as _rollout
from .rollout import Rollout

if TYPE_CHECKING:  # type hints only: the model imports mrbp, which imports this module
    from .model import Memformer

# The torch.compile backend: inductor on CPU and CUDA; tests may set "aot_eager" (the same graphs
# and AOTAutograd, without code generation) where inductor's compile time would dominate.
BACKEND = "inductor"
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Graphs per model and compiled function before a step falls back to eager (Dynamo's own default
# is 8, which one model's situations can exceed: 4 critical-path variants (no grad; replayed with
# context, with the writer or without, or without context) x padded or not x ragged or not x
# train or eval, per batch size).
RECOMPILE_LIMIT = 64


_GRAPHS: dict[tuple[str, str, str], tuple[Callable[..., Any], Callable[..., Any]]] = {}


def check_mode(compile: object, model: Memformer) -> str | None:
    """The ``torch.compile`` mode that ``mrbp.backward``'s ``compile`` argument asks for (None:
    eager). ``True`` is ``"default"``; ``"reduce-overhead"`` (CUDA graphs) needs a CUDA model
    without dropout in training: a captured graph would replay the same dropout masks."""
    if compile is False:
        return None
    if compile is True:
        return "default"
    if not isinstance(compile, str) or compile not in MODES:
        raise ValueError(f"compile must be a bool or one of {list(MODES)}, got {compile!r}")
    if compile in ("reduce-overhead", "max-autotune"):
        if model.training and model.config.stochastic:
            raise ValueError(
                f"compile={compile!r} uses CUDA graphs, which would replay one dropout mask "
                "(and memory noise) for every segment (they come from a generator of each call, "
                "not the graph's); use compile=True with dropout or memory_noise, or CUDA graphs "
                "with both 0 / eval"
            )
        if model.device.type != "cuda":
            raise ValueError(
                f"compile={compile!r} uses CUDA graphs, which need a CUDA model; "
                f"the model is on {model.device}. Use compile=True"
            )
    return compile


def inductor_options(mode: str, device_type: str) -> dict[str, Any]:
    """Inductor's options for ``mode`` on ``device_type``.

    On the CPU the generated code calls its kernels from a C++ wrapper (``cpp_wrapper``) instead
    of a Python function: a launch-bound segment runs about a thousand small kernels and extern
    calls, each of which costs microseconds of Python in the default wrapper; the C++ wrapper
    removes that cost (``benchmarks/results/compile/`` has the measurements). On CUDA the default
    Python wrapper stays: CUDA graphs (``reduce-overhead``) remove that cost there.
    """
    options = dict(torch._inductor.list_mode_options(mode))
    if device_type == "cpu":
        options["cpp_wrapper"] = True
    return options


def graphs(mode: str, device_type: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The compiled ``(critical path, decoder and loss)`` for ``mode`` on ``device_type`` (with
    :data:`BACKEND`), made once per process: Dynamo keeps their graphs per model and situation
    (guards), so later calls reuse them."""
    key = (BACKEND, mode, device_type)
    if key not in _GRAPHS:
        options: dict[str, Any] = {"fullgraph": True, "dynamic": False, "backend": BACKEND}
        if BACKEND == "inductor":
            options["options"] = inductor_options(mode, device_type)
        _GRAPHS[key] = (
            torch.compile(_rollout.encode, **options),
            torch.compile(_rollout.decode_loss, **options),
        )
    return _GRAPHS[key]


def rollout_step(
    model: Memformer,
    mode: str,
    rollout: Rollout,
    t: int,
    memory: Tensor,
    seed: int | None = None,
    with_loss: bool = True,
    with_memory: bool = True,
) -> tuple[Tensor | None, Tensor | None]:
    """:func:`memformer_fast.rollout.rollout_step`: :func:`~memformer_fast.rollout.run_segment`
    with its two parts through the compiled graphs. The same ``(loss share or None, M_{t+1})``,
    the same dropout masks (the model's ``rollout_step`` method is not called, so a wrapper of it
    does not see these steps).

    ``with_memory=False`` (a replayed segment with a loss, whose ``M_{t+1}`` gets no gradient):
    the writer does not run and ``M_{t+1}`` is None. A compiled graph's backward gives a zero
    gradient, not None, to a parameter it takes but does not reach: the writer's parameters would
    get zeros where eager MRBP and BPTT leave ``.grad`` None.
    """
    encode, decode_loss = graphs(mode, model.device.type)

    def critical(
        model: Memformer, ids: Tensor, memory: Tensor, mask: Tensor | None, reset: Tensor | None,
        with_context: bool, with_memory: bool,
    ) -> tuple[Tensor | None, Tensor | None]:  # fmt: skip
        if reset is None:  # one graph with and without resets: this where changes nothing
            reset = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        return _call(
            encode, _rollout.encode, model, _dense(ids), memory, _dense(mask), _dense(reset),
            with_context, with_memory,
        )  # fmt: skip

    def head(
        model: Memformer, decoder_inputs: Tensor | None, context: Tensor, mask: Tensor | None,
        decoder_mask: Tensor | None, targets: Tensor,
    ) -> Tensor:  # fmt: skip
        return _call(
            decode_loss, _rollout.decode_loss, model, decoder_inputs, context, _dense(mask),
            decoder_mask, _dense(targets),
        )  # fmt: skip

    memory = memory if memory.is_contiguous() else memory.contiguous()
    if torch.is_grad_enabled() and not memory.requires_grad:
        # The replay's first memory may not require grad (a caller's memory that does not): a
        # leaf that does keeps one graph for every segment; nobody asks for its gradient.
        memory = memory.detach().requires_grad_()
    loss, new_memory = _rollout.run_segment(
        model, rollout, t, memory, seed,
        head=head, critical=critical, with_head=with_loss, with_memory=with_memory,
    )  # fmt: skip
    return (None if loss is None else loss / rollout.num_targets), new_memory


_WARNED: set[str] = set()


def _call(compiled_fn: Callable[..., Any], eager_fn: Callable[..., Any], *args: Any) -> Any:
    """``compiled_fn(*args)``; past Dynamo's default limit of graphs per model, again with up to
    :data:`RECOMPILE_LIMIT`, and past that ``eager_fn(*args)`` (the same function, not compiled:
    the same result; Dynamo raises before running anything, so nothing ran twice)."""
    try:
        return compiled_fn(*args)
    except torch._dynamo.exc.FailOnRecompileLimitHit:
        pass
    limit = max(RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit)  # never lower the user's
    try:
        with torch._dynamo.config.patch(recompile_limit=limit):
            return compiled_fn(*args)
    except torch._dynamo.exc.FailOnRecompileLimitHit:
        name = eager_fn.__name__
        if name not in _WARNED:
            _WARNED.add(name)
            warnings.warn(
                f"mrbp.backward(compile=...): {name} has compiled {limit} graphs for "
                "this model (batch sizes, segment lengths, padding, train/eval); new layouts run "
                "eagerly (same results, no speed-up)",
                RuntimeWarning,
                stacklevel=3,
            )
        return eager_fn(*args)


def _dense(x: Tensor | None) -> Tensor | None:
    """``x`` contiguous. Dynamo guards on strides: a segment cut from ``[B, T*L]`` has a row
    stride ``T*L`` and the initial memory (the bias expanded over the batch) a batch stride 0,
    each of which would compile another graph (one per rollout length)."""
    return x if x is None or x.is_contiguous() else x.contiguous()
