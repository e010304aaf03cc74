"""MRBPTrainer under DistributedDataParallel: 2 CPU processes, gloo, 127.0.0.1 only.

Each rank runs ``Trainer.train()`` as ``torchrun`` would start it (accelerate reads the rank from
the environment and wraps the model in DDP). A comm hook counts DDP's all-reduces: one per
optimizer step whatever the gradient accumulation, and the ranks, which read different data,
end with identical parameters.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("transformers")

WORLD, STEPS, ACCUMULATION = 2, 3, 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).parent))
    from testing_utils import tiny_model
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel
    from transformers import TrainerCallback, TrainingArguments

    from memformer_fast.hf import MemformerForCausalLM, MRBPTrainer, stream_rollouts

    calls = {"all_reduce": 0}

    def counting_hook(state, bucket):  # unannotated: DDP checks annotations it can resolve
        calls["all_reduce"] += 1
        return default_hooks.allreduce_hook(None, bucket)  # type: ignore[arg-type]

    class CountAllReduces(TrainerCallback):
        def on_train_begin(self, args: object, state: object, control: object, **kw: object):
            wrapped = trainer.model_wrapped
            assert isinstance(wrapped, DistributedDataParallel), type(wrapped)
            wrapped.register_comm_hook(None, counting_hook)

    model = MemformerForCausalLM.from_memformer(tiny_model("decoder", n_decoder_layers=1))
    tokens = torch.randint(0, 23, (4000,), generator=torch.Generator().manual_seed(0))
    data = stream_rollouts(tokens, batch_size=2, rollout_length=15, num_processes=WORLD)
    args = TrainingArguments(
        output_dir=out, per_device_train_batch_size=2, gradient_accumulation_steps=ACCUMULATION,
        max_steps=STEPS, learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True,
        save_strategy="no", disable_tqdm=True, ddp_backend="gloo", seed=0,
    )  # fmt: skip
    trainer = MRBPTrainer(
        model=model, args=args, train_dataset=data, carry_memory=True,
        callbacks=[CountAllReduces()],
    )  # fmt: skip
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.save(
        {"calls": calls["all_reduce"], "losses": losses, "params": params},
        Path(out) / f"rank{rank}.pt",
    )
    # Tear gloo down before the interpreter exits: a process group left to the exit can abort a
    # rank ("terminate called without an active exception", SIGABRT) after its work is done.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_mrbp_trainer_all_reduces_once_per_optimizer_step(tmp_path: Path) -> None:
    mp.start_processes(
        _worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn"
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for rank in ranks:
        assert rank["calls"] == STEPS  # one bucket: one all-reduce per optimizer step
        assert len(rank["losses"]) == STEPS
        assert torch.isfinite(torch.tensor(rank["losses"])).all()
    # different data on each rank, the same parameters after every step: the gradients were averaged
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), name
