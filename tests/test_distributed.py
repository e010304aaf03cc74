"""MRBP under DistributedDataParallel: 2 processes, gloo, CPU, 127.0.0.1 only.

Every scenario runs in one spawn of two ranks (starting processes is the slow part). The ground
truth is full BPTT (``sequence_loss(...).backward()``) in this process on the combined batch: with
equal token counts per rank, DDP's mean over ranks of per-rank mean losses is the global mean.
"""

from __future__ import annotations

import functools
import os
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from testing_utils import grads, make_model
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

from memformer_fast import mrbp

WORLD, ROWS, SEG, T = 2, 2, 4, 3  # ranks, batch rows per rank, segment length, segments
TIMEOUT_S = 240


make_model = functools.partial(
    make_model, n_encoder_layers=1, n_decoder_layers=1, segment_length=SEG
)


def batches() -> list[torch.Tensor]:
    """Two rollouts of the combined batch ``[WORLD * ROWS, T * SEG]``."""
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 23, (WORLD * ROWS, T * SEG), generator=g) for _ in range(2)]


def _worker(rank: int, port: int, out: str) -> None:
    """One rank: every scenario, results saved to ``out/rank{rank}.pt``."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    rows = slice(rank * ROWS, (rank + 1) * ROWS)
    first, second = (b[rows] for b in batches())
    results: dict[str, object] = {}
    for arch in ("decoder", "encoder-decoder"):
        for bucket_view in (False, True):  # with find_unused_parameters=bucket_view, too
            key = f"{arch}/bucket_view={bucket_view}"
            net = make_model(arch)
            ddp = DDP(net, gradient_as_bucket_view=bucket_view, find_unused_parameters=bucket_view)
            calls = [0]

            def counting_hook(state, bucket, calls=calls):
                calls[0] += 1  # one call per bucket per synchronisation
                return default_hooks.allreduce_hook(None, bucket)

            ddp.register_comm_hook(None, counting_hook)
            # One rollout of T segments: gradients averaged once, equal to BPTT on the full batch.
            mrbp.backward(ddp, first)
            results[f"{key}/one"] = (grads(net), calls[0])
            # A second rollout accumulates, as loss.backward() would.
            mrbp.backward(ddp, second)
            results[f"{key}/two"] = (grads(net), calls[0])

    # no_sync(): accumulate locally, average everything at the next synchronised call.
    net = make_model("decoder")
    ddp = DDP(net)
    with ddp.no_sync():
        mrbp.backward(ddp, first)
    local = grads(net)
    mrbp.backward(ddp, second)
    results["no_sync"] = (local, grads(net))

    # Non-finite values on ONE rank: every rank raises, no gradient moves, nothing hangs.
    net = make_model("decoder")
    ddp = DDP(net)
    mrbp.backward(ddp, first)
    before = grads(net)
    memory = net.init_memory(ROWS).detach().clone()
    if rank == 1:
        memory[0, 0, 0] = float("nan")
    errors = []
    try:
        mrbp.backward(ddp, second, memory)
    except FloatingPointError as error:
        errors.append(str(error))
    real_step = net.rollout_step

    def nan_step(rollout, t, memory, seed=None, with_loss=True):
        loss, new = real_step(rollout, t, memory, seed, with_loss)
        return (loss * float("nan") if loss is not None and t == 1 else loss), new

    if rank == 1:
        net.rollout_step = nan_step  # type: ignore[method-assign]
    try:
        mrbp.backward(ddp, second)
    except FloatingPointError as error:
        errors.append(str(error))
    net.__dict__.pop("rollout_step", None)
    unchanged = grads(net)
    mrbp.backward(ddp, second)  # DDP is still healthy afterwards
    results["nan"] = (errors, before, unchanged, grads(net))

    results["fsdp"] = _fsdp_scenario(first)
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _fsdp_scenario(ids: torch.Tensor) -> tuple[dict[str, torch.Tensor], str] | None:
    """FSDP2: BPTT through ``sequence_loss`` registered as a forward method; MRBP refuses."""
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    except ImportError:  # torch < 2.6
        return None
    net = make_model("decoder")
    mesh = init_device_mesh("cpu", (WORLD,))
    for block in net.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(net, mesh=mesh)
    register_fsdp_forward_method(net, "sequence_loss")
    net.sequence_loss(ids)[0].backward()
    full = {n: p.grad.full_tensor() for n, p in net.named_parameters() if p.grad is not None}
    try:
        mrbp.backward(net, ids)
    except TypeError as error:
        return full, str(error)
    return full, ""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(out: Path) -> None:
    """Spawn the ranks and wait for them, killing them if they run past ``TIMEOUT_S`` (a hang)."""
    saved = os.environ.get("GLOO_SOCKET_IFNAME")
    if sys.platform == "linux" and saved is None:
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # the children inherit it: loopback only
    try:
        context = mp.start_processes(
            _worker, args=(free_port(), str(out)), nprocs=WORLD, join=False, start_method="spawn"
        )
    finally:
        if saved is None:
            os.environ.pop("GLOO_SOCKET_IFNAME", None)
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the DDP ranks did not finish within {TIMEOUT_S} s")


def bptt_grads(arch: str, rollouts: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    net = make_model(arch)
    for ids in rollouts:
        net.sequence_loss(ids)[0].backward()
    return grads(net)


def assert_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path_factory.mktemp("ddp")
    run_ranks(out)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.slow
@pytest.mark.parametrize("bucket_view", [False, True])
@pytest.mark.parametrize("arch", ["decoder", "encoder-decoder"])
def test_ddp_gradients_equal_single_process_and_sync_once_per_rollout(
    ranks: list[dict], arch: str, bucket_view: bool
) -> None:
    first, second = batches()
    key = f"{arch}/bucket_view={bucket_view}"
    for result in ranks:
        (one, calls_one), (two, calls_two) = result[f"{key}/one"], result[f"{key}/two"]
        assert calls_one == 1 and calls_two == 2, "one all-reduce per rollout, not per segment"
        assert_close(one, bptt_grads(arch, [first]))
        assert_close(two, bptt_grads(arch, [first, second]))
    for name, g in ranks[0][f"{key}/two"][0].items():
        assert torch.equal(g, ranks[1][f"{key}/two"][0][name]), "ranks disagree"


@pytest.mark.slow
def test_ddp_no_sync_accumulates_locally_then_averages_everything(ranks: list[dict]) -> None:
    first, second = batches()
    rows = [slice(r * ROWS, (r + 1) * ROWS) for r in range(WORLD)]
    for rank, result in enumerate(ranks):
        local, synced = result["no_sync"]
        assert_close(local, bptt_grads("decoder", [first[rows[rank]]]))
        assert_close(synced, bptt_grads("decoder", [first, second]))


@pytest.mark.slow
def test_ddp_non_finite_on_one_rank_raises_on_every_rank(ranks: list[dict]) -> None:
    first, second = batches()
    for result in ranks:
        errors, before, unchanged, after = result["nan"]
        assert len(errors) == 2
        assert "segment 0 is not finite on at least one DDP rank" in errors[0]
        assert "loss of segment 1 is not finite on at least one DDP rank" in errors[1]
        for name in before:
            assert torch.equal(before[name], unchanged[name]), name
        assert_close(after, bptt_grads("decoder", [first, second]))


@pytest.mark.slow
def test_fsdp2_bptt_works_and_mrbp_refuses_it(ranks: list[dict]) -> None:
    if ranks[0]["fsdp"] is None:
        pytest.skip("FSDP2 (torch.distributed.fsdp.fully_shard) needs torch >= 2.6")
    first, _ = batches()
    for result in ranks:
        full, error = result["fsdp"]
        assert_close(full, bptt_grads("decoder", [first]))
        assert "mrbp.backward does not support FSDP" in error
