"""``MRBPTrainer``: ``transformers.Trainer`` whose training step is ``mrbp.backward``.

Each batch is a rollout ``input_ids [B, T*L]`` (with optional ``attention_mask`` and ``labels``);
its gradients come from Memory Replay Back-Propagation, so the activations of one segment are
alive at a time whatever ``T``. Everything else is the Trainer's: optimizer, schedule, clipping,
logging, checkpoints, evaluation (``forward`` with ``labels``: the same loss).
"""

from __future__ import annotations

from typing import Any, cast

from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, SequentialSampler
from transformers import Trainer, TrainerCallback

from .. import mrbp
from .modeling import MemformerForCausalLM

BATCH_KEYS = frozenset({"input_ids", "attention_mask", "labels"})


class MRBPTrainer(Trainer):
    """A ``Trainer`` for :class:`MemformerForCausalLM` that trains on rollouts with MRBP.

    Args (besides the ``Trainer``'s):
        carry_memory: pass each rollout's final memory ``M_T`` into the next rollout of the same
            streams (truncated back-propagation through time across rollouts). Then the training
            data is read in order (no shuffling) and batch ``k + 1`` must continue the streams of
            batch ``k`` row by row on each process: :func:`stream_rollouts` lays a token stream
            out that way. The memory is reset at each epoch and whenever the batch size changes.
            With ``False`` (default) every rollout starts from ``M_0``.
        offload: ``mrbp.backward``'s replay buffer in pinned host memory (CUDA).

    Semantics:

    - gradient accumulation: the micro-steps' gradients are averaged (each rollout's loss is a
      mean over its tokens, as ``mrbp.backward`` defines it), and the returned loss is divided
      by the accumulation steps, as ``Trainer.training_step`` does, so the logged ``loss`` is the
      mean rollout loss;
    - DistributedDataParallel: ``mrbp.backward`` runs on the unwrapped model, so micro-steps
      accumulate locally, and the gradients are all-reduced once per optimizer step, on the
      last micro-step, through DDP's own reducer (its buckets and comm hooks);
    - mixed precision: ``bf16=True`` runs the rollout under ``accelerator.autocast()`` (the
      memory stays in ``memory_dtype``). ``fp16=True`` is refused: it needs loss scaling, which
      ``mrbp.backward``'s internal backward calls do not apply.
    """

    def __init__(
        self, *args: Any, carry_memory: bool = False, offload: bool = False, **kwargs: Any
    ) -> None:
        for name, flag in (("carry_memory", carry_memory), ("offload", offload)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__} {flag!r}")
        super().__init__(*args, **kwargs)
        if not isinstance(self.model, MemformerForCausalLM):
            raise TypeError(
                f"MRBPTrainer trains a MemformerForCausalLM, got {type(self.model).__name__}"
            )
        if self.args.fp16:
            raise ValueError(
                "MRBPTrainer does not support fp16=True (it needs loss scaling, which "
                "mrbp.backward does not apply): use bf16=True, or float32"
            )
        self.carry_memory, self.offload = carry_memory, offload
        self.memory: Tensor | None = None  # M_T of the previous rollout, when carried
        self.add_callback(_ResetMemoryEachEpoch(self))

    def reset_memory(self) -> None:
        """Start the next rollout from ``M_0``."""
        self.memory = None

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``; an empty ``train_dataset`` is refused with a ``ValueError`` (with
        ``carry_memory`` the Trainer reported success at step 0, without it torch said
        "num_samples should be a positive integer value")."""
        data = self.train_dataset
        if data is not None and hasattr(data, "__len__") and len(cast(Any, data)) == 0:
            raise ValueError(
                "MRBPTrainer: train_dataset is empty (0 rollouts): nothing to train on; check "
                "the data, or that stream_rollouts got at least one rollout per stream"
            )
        return super().train(*args, **kwargs)

    def _get_train_sampler(self, train_dataset: Dataset | None = None) -> Any:
        if self.carry_memory:  # batches must follow the streams in order
            data = self.train_dataset if train_dataset is None else train_dataset
            return SequentialSampler(cast(Any, data))
        return super()._get_train_sampler(train_dataset)

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor | Any],
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor:
        """One micro-step: ``mrbp.backward`` on the batch's rollout; returns the detached loss
        divided by the gradient accumulation steps (what ``Trainer`` sums and logs)."""
        unknown = sorted(set(inputs) - BATCH_KEYS)
        if unknown:
            raise ValueError(
                f"MRBPTrainer batches hold {sorted(BATCH_KEYS)}, got also {unknown} (set "
                "remove_unused_columns=True, or drop them in the collator)"
            )
        model.train()
        inputs = self._prepare_inputs(inputs)
        wrapped = cast(MemformerForCausalLM, self.accelerator.unwrap_model(model))
        net = wrapped.memformer
        input_ids = inputs["input_ids"]
        memory = self.memory
        if memory is not None and memory.shape[0] != input_ids.shape[0]:
            memory = None  # another batch size: not the same streams
        with self.accelerator.autocast():
            result = mrbp.backward(
                net,
                input_ids,
                memory if self.carry_memory else None,
                attention_mask=inputs.get("attention_mask"),
                labels=inputs.get("labels"),
                offload=self.offload,
            )
        if self.carry_memory:
            self.memory = result.memory
        steps = int(getattr(self, "current_gradient_accumulation_steps", 1) or 1)
        if self.accelerator.sync_gradients:  # the last micro-step before the optimizer step
            params = [p for p in net.parameters() if p.requires_grad]
            if steps > 1:  # the micro-steps' summed gradients become their mean
                for p in params:
                    if p.grad is not None:
                        p.grad.div_(steps)
            if isinstance(model, DistributedDataParallel):
                # One all-reduce of everything accumulated, through the DDP wrapper's reducer.
                mrbp.synchronize_gradients(model, params)
        return result.loss.detach() / steps


class _ResetMemoryEachEpoch(TrainerCallback):
    """A new epoch restarts the streams: the carried memory must not leak into it."""

    def __init__(self, trainer: MRBPTrainer) -> None:
        self.trainer = trainer

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer.reset_memory()


def stream_rollouts(
    tokens: Tensor, batch_size: int, rollout_length: int, num_processes: int = 1
) -> list[dict[str, Tensor]]:
    """Lay a token stream out as rollouts for ``MRBPTrainer(carry_memory=True)``.

    ``tokens [N]`` is cut into ``batch_size * num_processes`` contiguous streams, each into
    rollouts of ``rollout_length`` tokens; the examples are ordered so that, read in order with
    ``per_device_train_batch_size=batch_size`` (and each process taking every
    ``num_processes``-th batch, as ``accelerate`` shards a sequential loader), every batch
    continues the previous batch of its process row by row. Returns
    ``[{"input_ids": [R], "labels": [R]}]`` (labels are the ids: the Trainer's evaluation needs
    them; ``forward`` shifts them inside).
    """
    for name, value in (
        ("batch_size", batch_size),
        ("rollout_length", rollout_length),
        ("num_processes", num_processes),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(tokens, Tensor) or tokens.dim() != 1:
        raise ValueError(f"tokens must be a 1-D tensor of token ids, got {tokens!r:.80}")
    n_streams = batch_size * num_processes
    per_stream = tokens.shape[0] // n_streams // rollout_length * rollout_length
    if per_stream == 0:
        raise ValueError(
            f"tokens has {tokens.shape[0]} ids, fewer than one rollout of {rollout_length} for "
            f"each of {n_streams} streams"
        )
    streams = tokens[: n_streams * per_stream].view(n_streams, per_stream)
    rollouts = streams.split(rollout_length, dim=1)  # [n_streams, R] per rollout index
    return [
        {"input_ids": rollout[row], "labels": rollout[row]}
        for rollout in rollouts
        for row in range(n_streams)
    ]
