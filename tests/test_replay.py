"""The replay buffer extension ``memformer_fast._C`` (docs/design.md, "Public API")."""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from testing_utils import grads, relative_error, tiny_model

import memformer_fast
from memformer_fast import Memformer, mrbp, replay
from memformer_fast.replay import ReplayBuffer, build_info, load_extension

ROOT = Path(__file__).resolve().parent.parent
HAS_CUDA = torch.cuda.is_available()
CUDA_MARKS = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]
PLACEMENTS = [
    pytest.param("cpu", False, id="cpu"),
    pytest.param("cpu", True, id="cpu-offload"),
    pytest.param("cuda", False, id="cuda", marks=CUDA_MARKS),
    pytest.param("cuda", True, id="cuda-offload", marks=CUDA_MARKS),
]
SHAPE = (3, 5, 7)


def random_states(n: int, dtype: torch.dtype, device: str, shape=SHAPE) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    return [torch.randn(shape, generator=g).to(device=device, dtype=dtype) for _ in range(n)]


def state_bytes(dtype: torch.dtype, shape=SHAPE) -> int:
    return torch.Size(shape).numel() * dtype.itemsize


def filled(states, device: str, offload: bool, capacity: int | None = None) -> ReplayBuffer:
    buffer = ReplayBuffer(capacity or len(states), SHAPE, states[0].dtype, device, offload)
    for i, state in enumerate(states):
        assert buffer.push(state, rng_seed=100 + i) == i
    return buffer


# The build ---------------------------------------------------------------------------------------


def test_extension_is_built_and_backs_the_buffer():
    from memformer_fast import _C

    assert load_extension() is _C
    assert memformer_fast.ReplayBuffer is ReplayBuffer
    buffer = ReplayBuffer(2, SHAPE, torch.float32, "cpu")
    assert isinstance(buffer._impl, _C.ReplayBuffer)
    assert (torch.version.cuda is not None) == _C.WITH_CUDA


def test_build_info_reports_the_extension():
    info = build_info()
    assert info["extension_built"] and info["extension_error"] is None
    assert info["with_cuda"] == (torch.version.cuda is not None)
    assert info["torch"] == torch.__version__
    assert info["torch_built"] == torch.__version__.split("+")[0]
    assert info["compiler"]
    if info["with_cuda"]:
        assert info["cuda_archs"] and info["cuda_compiled"]


def test_missing_extension_is_an_import_error_with_the_rebuild_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "memformer_fast._C", None)  # makes the import fail
    load_extension.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"pip install --no-build-isolation -e \."):
            ReplayBuffer(2, SHAPE, torch.float32, "cpu")
        assert "pip install" in build_info()["extension_error"]
    finally:
        monkeypatch.undo()
        load_extension.cache_clear()
    assert load_extension() is memformer_fast._C


def test_stale_sources_are_reported(tmp_path, monkeypatch):
    (tmp_path / "setup.py").touch()
    (tmp_path / "csrc" / "cuda").mkdir(parents=True)
    built = tmp_path / "_C.so"
    built.touch()
    old, new = tmp_path / "csrc" / "old.cpp", tmp_path / "csrc" / "cuda" / "new.cu"
    old.touch()
    new.touch()
    stamp = built.stat().st_mtime
    for path, offset in [(old, -10), (new, 10)]:
        os.utime(path, (stamp + offset, stamp + offset))
    monkeypatch.setattr(replay, "_SOURCE_ROOT", tmp_path)
    assert replay._stale_sources(built) == ["csrc/cuda/new.cu"]


def test_nvcc_compiles_the_cuda_sources(tmp_path):
    """The CUDA variant's runtime calls compile with nvcc alone (torch here may be CPU-only) and
    define exactly the functions the CPU build's stub defines, so both variants link."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    cuda_obj, stub_obj = tmp_path / "runtime_ops.o", tmp_path / "runtime_ops_cpu.o"
    arch_flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ("80", "90")]
    subprocess.run(
        [nvcc, "-c", str(ROOT / "csrc/cuda/runtime_ops.cu"), "-o", str(cuda_obj), "-std=c++17",
         *arch_flags, "-Werror=all-warnings", "-Xcompiler=-Wall,-Wextra,-Werror"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    assert cuda_obj.stat().st_size > 0
    cxx, nm = shutil.which("c++"), shutil.which("nm")
    if cxx is None or nm is None:
        return
    subprocess.run(
        [cxx, "-c", str(ROOT / "csrc/cuda/runtime_ops_cpu.cpp"), "-o", str(stub_obj),
         "-std=c++17", "-Wall", "-Wextra", "-Werror"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip

    def exported(obj: Path) -> set[str]:
        out = subprocess.run([nm, "-C", "--defined-only", "-g", str(obj)], check=True,
                             capture_output=True, text=True).stdout  # fmt: skip
        names = (line.split(" ", 2)[2] for line in out.splitlines())
        # nvcc gives anonymous-namespace helpers external linkage under a unique name: skip them
        return {n for n in names if "memformer_fast::" in n and "(anonymous namespace)" not in n}

    assert exported(cuda_obj) == exported(stub_obj)
    assert "memformer_fast::cuda::memcpy_async(void*, void const*, unsigned long, void*)" in (
        exported(cuda_obj)
    )


# Behaviour on every placement --------------------------------------------------------------------


@pytest.mark.parametrize("device,offload", PLACEMENTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip(device, offload, dtype):
    states = random_states(6, dtype, device)
    buffer = filled(states, device, offload)
    assert len(buffer) == 6
    for i in [3, 0, 5, 5, 1, 4, 2]:  # any order, repeats included
        if offload:
            buffer.prefetch(max(i - 1, 0))
        out = buffer.get(i)
        assert out.dtype == dtype and out.shape == SHAPE and out.device.type == device
        assert torch.equal(out, states[i])
        assert buffer.rng_seed(i) == 100 + i
        assert not out.requires_grad


@pytest.mark.parametrize("device,offload", PLACEMENTS)
def test_states_are_copied_in_and_out(device, offload):
    states = random_states(3, torch.float32, device)
    expected = [s.clone() for s in states]
    buffer = filled(states, device, offload)
    for s in states:
        s.fill_(float("nan"))  # the caller reuses its tensors after push
    first = buffer.get(1)
    second = buffer.get(1)
    assert first.data_ptr() != second.data_ptr()
    first.zero_()  # the caller owns what get returns
    assert torch.equal(second, expected[1])
    assert torch.equal(buffer.get(1), expected[1])
    popped = buffer.pop()
    buffer.push(torch.zeros_like(popped))  # overwrites the popped entry's storage
    assert torch.equal(popped, expected[2])
    assert torch.equal(second, expected[1])


@pytest.mark.parametrize("device,offload", PLACEMENTS)
def test_push_takes_any_strides_and_drops_autograd(device, offload):
    base = torch.randn(SHAPE[::-1], device=device, requires_grad=True)
    strided = base.permute(2, 1, 0) * 2  # non-contiguous, part of a graph
    expanded = torch.randn(1, 5, 7, device=device).expand(SHAPE)  # stride 0
    buffer = ReplayBuffer(2, SHAPE, torch.float32, device, offload)
    buffer.push(strided)
    buffer.push(expanded)
    out = buffer.get(0)
    assert not out.requires_grad and out.grad_fn is None and out.is_contiguous()
    assert torch.equal(out, strided.detach())
    assert torch.equal(buffer.get(1), expanded)


@pytest.mark.parametrize("device,offload", PLACEMENTS)
def test_ordering_pop_and_reuse(device, offload):
    states = random_states(5, torch.float32, device)
    buffer = filled(states[:3], device, offload, capacity=4)
    if offload:
        buffer.prefetch(2)  # a cached copy of entry 2 must not survive its pop
    assert torch.equal(buffer.get(2), states[2])
    assert torch.equal(buffer.pop(), states[2])
    assert len(buffer) == 2
    assert buffer.push(states[3], rng_seed=7) == 2
    assert torch.equal(buffer.get(2), states[3]) and buffer.rng_seed(2) == 7
    assert buffer.push(states[4]) == 3
    popped = [buffer.pop() for _ in range(4)]
    for out, expected in zip(popped, [states[4], states[3], states[1], states[0]]):
        assert torch.equal(out, expected)
    assert len(buffer) == 0


@pytest.mark.parametrize("device,offload", PLACEMENTS)
def test_clear_then_reuse(device, offload):
    states = random_states(4, torch.float32, device)
    buffer = filled(states[:2], device, offload, capacity=2)
    buffer.prefetch(1)
    buffer.clear()
    assert len(buffer) == 0
    with pytest.raises(IndexError, match="cleared"):
        buffer.get(1)
    buffer.push(states[2])
    buffer.push(states[3], rng_seed=-5)
    assert torch.equal(buffer.get(1), states[3]) and buffer.rng_seed(1) == -5
    assert torch.equal(buffer.get(0), states[2])


def test_rng_seed_round_trip_recreates_randomness():
    seeds = [0, 1, -1, 2**63 - 1, -(2**63), 123456789]
    buffer = ReplayBuffer(len(seeds), (4,), torch.float32, "cpu")
    masks = []
    for seed in seeds:
        torch.manual_seed(seed)
        masks.append(torch.rand(64) < 0.5)
        buffer.push(torch.zeros(4), seed)
    for i in reversed(range(len(seeds))):
        assert buffer.rng_seed(i) == seeds[i]
        torch.manual_seed(buffer.rng_seed(i))
        assert torch.equal(torch.rand(64) < 0.5, masks[i])
    default = ReplayBuffer(1, (1,), torch.float32, "cpu")
    default.push(torch.zeros(1))
    assert default.rng_seed(0) == 0


@pytest.mark.parametrize("device,offload", PLACEMENTS)
def test_nbytes(device, offload):
    full = 9 * state_bytes(torch.bfloat16)
    buffer = ReplayBuffer(9, SHAPE, torch.bfloat16, device, offload)
    if device == "cpu":
        assert (buffer.nbytes("host"), buffer.nbytes("device")) == (full, 0)
    elif not offload:
        assert (buffer.nbytes("host"), buffer.nbytes("device")) == (0, full)
    else:
        assert buffer.nbytes("host") == full
        assert buffer.nbytes("device") == 4 * state_bytes(torch.bfloat16)  # staging, any capacity
    assert buffer.nbytes() == buffer.nbytes("device")


def test_properties_and_repr():
    buffer = ReplayBuffer(4, [2, 3], torch.bfloat16, torch.device("cpu"), offload=True)
    assert buffer.capacity == 4 and buffer.shape == (2, 3) and buffer.dtype == torch.bfloat16
    assert buffer.device == torch.device("cpu") and buffer.offload is True
    assert buffer.fetch_misses == 0  # host storage: nothing to fetch
    assert repr(buffer) == (
        "ReplayBuffer(len=0, capacity=4, shape=(2, 3), dtype=torch.bfloat16, device=cpu, "
        "offload=True)"
    )
    scalar = ReplayBuffer(2, (), torch.float32, "cpu")
    scalar.push(torch.tensor(3.5))
    assert scalar.get(0).item() == 3.5


# Errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device,offload", PLACEMENTS)
def test_failed_pushes_raise_and_change_nothing(device, offload):
    states = random_states(2, torch.float32, device)
    buffer = filled(states, device, offload)
    double = torch.zeros(SHAPE, device=device, dtype=torch.float64)
    bad = [
        (
            torch.zeros(3, 5, 6, device=device),
            ValueError,
            r"shape \(3, 5, 6\), expected \(3, 5, 7\)",
        ),
        (double, TypeError, "dtype Double, expected Float"),
        (torch.zeros(SHAPE, device="meta"), ValueError, "is on meta, expected"),
        (torch.zeros(SHAPE, device=device).to_sparse(), TypeError, "dense"),
        (states[0], IndexError, r"full \(capacity 2\)"),
    ]
    for state, error, message in bad:
        with pytest.raises(error, match=message):
            buffer.push(state, rng_seed=999)
    with pytest.raises(TypeError):
        buffer.push(None)
    with pytest.raises(TypeError):
        buffer.push(states[0], rng_seed=2**64)
    assert len(buffer) == 2
    for i, state in enumerate(states):
        assert torch.equal(buffer.get(i), state) and buffer.rng_seed(i) == 100 + i


@pytest.mark.parametrize("device,offload", PLACEMENTS)
def test_bad_indices_raise_index_error(device, offload):
    buffer = filled(random_states(2, torch.float32, device), device, offload, capacity=3)
    for method in ("get", "rng_seed", "prefetch"):
        for index in (2, -1, 3, 10**6):
            with pytest.raises(
                IndexError, match=rf"{method}: index {index} is out of range \[0, 2\)"
            ):
                getattr(buffer, method)(index)
    buffer.clear()
    with pytest.raises(IndexError, match="empty"):
        buffer.pop()
    with pytest.raises(
        IndexError, match=r"index 0 is out of range \[0, 0\) \(the buffer was cleared\)"
    ):
        buffer.get(0)


def test_wrong_device_of_state():
    if HAS_CUDA:
        with pytest.raises(ValueError, match="is on cuda:0, expected cpu"):
            ReplayBuffer(1, SHAPE, torch.float32, "cpu").push(torch.zeros(SHAPE, device="cuda"))
        with pytest.raises(ValueError, match="is on cpu, expected cuda:0"):
            ReplayBuffer(1, SHAPE, torch.float32, "cuda", True).push(torch.zeros(SHAPE))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="capacity must be positive, got 0"):
        ReplayBuffer(0, SHAPE, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"positive sizes, got \(3, -1\)"):
        ReplayBuffer(2, (3, -1), torch.float32, "cpu")
    with pytest.raises(ValueError, match="cpu or cuda, got meta"):
        ReplayBuffer(2, SHAPE, torch.float32, "meta")
    with pytest.raises(ValueError, match="do not fit"):
        ReplayBuffer(2**40, (2**40,), torch.float32, "cpu")
    with pytest.raises(TypeError):
        ReplayBuffer(2, SHAPE, "float32", "cpu")
    with pytest.raises(TypeError):
        ReplayBuffer(2.5, SHAPE, torch.float32, "cpu")
    with pytest.raises(ValueError, match="where must be 'device' or 'host', got 'gpu'"):
        ReplayBuffer(2, SHAPE, torch.float32, "cpu").nbytes("gpu")
    if not HAS_CUDA:  # a CPU build, or a CUDA build on a machine without a device
        with pytest.raises(RuntimeError, match="CUDA"):
            ReplayBuffer(2, SHAPE, torch.float32, "cuda")


# MRBP through the extension buffer ---------------------------------------------------------------


def tiny_training_model(arch: str, device: str) -> Memformer:
    model = tiny_model(arch, vocab_size=29, n_memory_slots=4, dropout=0.1)
    return model.to(device).train()


def mrbp_gradients(model: Memformer, ids: torch.Tensor, offload: bool):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    result = mrbp.backward(model, ids, offload=offload)
    return result, grads(model)


@pytest.fixture
def buffers_made(monkeypatch) -> list[ReplayBuffer]:
    """Every replay buffer MRBP creates during the test."""
    made: list[ReplayBuffer] = []

    class Recording(ReplayBuffer):
        __slots__ = ()

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(mrbp, "ReplayBuffer", Recording)
    return made


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA_MARKS)])
@pytest.mark.parametrize("arch", ["encoder-decoder", "decoder"])
def test_mrbp_gradients_identical_with_offload(device, arch, buffers_made):
    model = tiny_training_model(arch, device)
    ids = torch.randint(0, 29, (2, 5 * 7 + 3), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    plain, expected = mrbp_gradients(model, ids, offload=False)
    offloaded, actual = mrbp_gradients(model, ids, offload=True)
    assert [b.offload for b in buffers_made] == [False, True]
    assert all(isinstance(b._impl, memformer_fast._C.ReplayBuffer) for b in buffers_made)
    assert buffers_made[1].fetch_misses <= 1  # MRBP's prefetches arrive before its reads
    assert expected.keys() == actual.keys() and expected
    if device == "cpu":  # same kernels, same order: bit for bit
        assert torch.equal(plain.loss, offloaded.loss)
        assert torch.equal(plain.memory, offloaded.memory)
        assert all(torch.equal(actual[n], expected[n]) for n in expected)
    else:  # CUDA backward kernels may accumulate with atomics
        assert relative_error(offloaded.loss, plain.loss) < 1e-6
        assert max(relative_error(actual[n], expected[n]) for n in expected) < 1e-5


def test_mrbp_with_offload_equals_bptt():
    model = tiny_training_model("encoder-decoder", "cpu")
    ids = torch.randint(0, 29, (2, 5 * 6), generator=torch.Generator().manual_seed(1))
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    loss, _ = model.sequence_loss(ids)
    loss.backward()
    expected = grads(model)
    result, actual = mrbp_gradients(model, ids, offload=True)
    assert relative_error(result.loss, loss) < 1e-5
    assert max(relative_error(actual[n], expected[n]) for n in expected) < 1e-5


# Offload storage reused across buffers ----------------------------------------------------------


@pytest.fixture
def allocations(monkeypatch) -> list[tuple]:
    """The configuration of every ``_C.ReplayBuffer`` allocated during the test (offload or not),
    starting from an empty offload cache."""
    made: list[tuple] = []
    allocate = replay._allocate

    def counting(*args):
        impl = allocate(*args)
        made.append(args)
        return impl

    monkeypatch.setattr(replay, "_allocate", counting)
    gc.collect()  # buffers of earlier tests left in reference cycles would park when collected
    replay.offload_cache.release()
    yield made
    replay.offload_cache.release()


def offloaded(made: list[tuple]) -> list[tuple]:
    return [args[:4] for args in made if args[4]]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA_MARKS)])
def test_offload_storage_is_allocated_once_across_mrbp_calls(device, allocations):
    """Several ``mrbp.backward(..., offload=True)`` calls of one shape allocate the host storage
    once; another shape frees it and allocates once more; ``release()`` frees it on request. The
    gradients are those of the non-offload path every time."""
    model = tiny_training_model("encoder-decoder", device)
    ids = torch.randint(0, 29, (2, 5 * 4), generator=torch.Generator().manual_seed(0)).to(device)
    _, expected = mrbp_gradients(model, ids, offload=False)
    stats = (replay.offload_cache.allocations, replay.offload_cache.reuses)
    for _ in range(3):
        _, actual = mrbp_gradients(model, ids, offload=True)
        assert all(torch.equal(actual[n], expected[n]) for n in expected)
    config = (4, (2, 4, 16), torch.float32, _resolved(device))
    assert offloaded(allocations) == [config]
    assert replay.offload_cache.allocations - stats[0] == 1
    assert replay.offload_cache.reuses - stats[1] == 2
    parked = replay.offload_cache.nbytes()
    assert parked == 4 * 2 * 4 * 16 * 4  # capacity x batch x slots x width x float32

    wider = ids.repeat(2, 1)  # batch 4: another state shape
    mrbp_gradients(model, wider, offload=True)
    mrbp_gradients(model, wider, offload=True)
    assert offloaded(allocations) == [config, (4, (4, 4, 16), torch.float32, config[3])]
    assert replay.offload_cache.nbytes() == 2 * parked  # the batch-2 storage was freed

    assert replay.offload_cache.release() == 2 * parked
    assert replay.offload_cache.nbytes() == 0 and replay.offload_cache.release() == 0
    _, actual = mrbp_gradients(model, ids, offload=True)
    assert len(offloaded(allocations)) == 3
    assert all(torch.equal(actual[n], expected[n]) for n in expected)


def _resolved(device: str) -> torch.device:
    return replay._resolved(torch.device(device))


def test_a_failed_mrbp_call_leaves_the_reused_storage_valid(allocations):
    """A call that fails after filling the buffer (a non-finite loss, found after the replay)
    still hands back a cleared storage: the next call reuses it and gets the right gradients."""
    model = tiny_training_model("encoder-decoder", "cpu")
    ids = torch.randint(0, 29, (2, 5 * 4), generator=torch.Generator().manual_seed(0))
    _, expected = mrbp_gradients(model, ids, offload=True)
    with torch.no_grad():
        saved = model.lm_head.weight.clone()
        model.lm_head.weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="loss of segment"):
        mrbp_gradients(model, ids, offload=True)
    gc.collect()  # the traceback's frames held the failed call's buffer
    with torch.no_grad():
        model.lm_head.weight.copy_(saved)
    _, actual = mrbp_gradients(model, ids, offload=True)
    assert len(offloaded(allocations)) == 1
    assert all(torch.equal(actual[n], expected[n]) for n in expected)


def test_closed_buffers_park_their_storage_empty(allocations):
    states = random_states(3, torch.float32, "cpu")
    with filled(states, "cpu", offload=True) as first:
        with pytest.raises(ValueError, match="shape"):
            first.push(torch.zeros(2, 2))  # a failed push: nothing changed
        assert len(first) == 3
    assert repr(first) == "ReplayBuffer(closed)"
    for use in (lambda: len(first), lambda: first.get(0), lambda: first.push(states[0])):
        with pytest.raises(RuntimeError, match="closed"):
            use()
    first.close()  # twice: nothing happens
    second = ReplayBuffer(3, SHAPE, torch.float32, "cpu", offload=True)
    assert len(second) == 0 and len(offloaded(allocations)) == 1  # the same storage, emptied
    with pytest.raises(IndexError, match="out of range"):
        second.get(0)
    second.push(states[2], rng_seed=7)
    assert torch.equal(second.get(0), states[2]) and second.rng_seed(0) == 7
    other = ReplayBuffer(2, SHAPE, torch.float32, "cpu", offload=True)  # another capacity
    plain = ReplayBuffer(3, SHAPE, torch.float32, "cpu")  # not offloaded: never cached
    del second, other, plain
    assert len(offloaded(allocations)) == 2 and len(allocations) == 3
    assert replay.offload_cache.nbytes() == 2 * state_bytes(torch.float32)  # the last one parked


# CUDA: streams, device memory, offload against no offload ----------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
class TestCuda:
    def test_offload_round_trips_under_concurrent_compute(self):
        """Pushes from one stream, gets on another, heavy matmuls on a third; sources are
        dropped right after each push and results right after use, so a missing event or
        stream dependency shows up as another state's (or freed memory's) data."""
        shape, num = (8, 64, 1024), 24  # 2 MiB states: copies last long enough to race
        producer, consumer, other = (torch.cuda.Stream() for _ in range(3))
        big = torch.randn(2048, 2048, device="cuda")
        for stream in (producer, consumer, other):
            stream.wait_stream(torch.cuda.current_stream())
        buffer = ReplayBuffer(num, shape, torch.float32, "cuda", offload=True)
        expected, got, busy = [], {}, []
        with torch.cuda.stream(other):
            busy += [big @ big for _ in range(4)]
        with torch.cuda.stream(producer):
            x = torch.randn(shape, device="cuda")
            for t in range(num):
                x = torch.tanh(x * 1.5 + t)
                expected.append(x.sum(dim=0))
                buffer.push(x, rng_seed=t)
        with torch.cuda.stream(consumer):
            for t in reversed(range(num)):
                if t > 0:
                    buffer.prefetch(t - 1)
                state = buffer.get(t)
                got[t] = state.sum(dim=0)
                del state
                with torch.cuda.stream(other):
                    busy.append(big @ big)
        torch.cuda.synchronize()
        for t in range(num):
            assert torch.equal(got[t], expected[t]), t
            assert buffer.rng_seed(t) == t
        assert buffer.fetch_misses == 1  # only the first read: every later one was prefetched

    @staticmethod
    def peak_device_bytes(num: int, offload: bool, shape=(4, 32, 256)) -> int:
        """Peak device memory of pushing ``num`` states and walking them back as MRBP does."""
        replay.offload_cache.release()  # a parked storage's staging slots would count in `base`
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        buffer = ReplayBuffer(num, shape, torch.float32, "cuda", offload)
        m = torch.randn(shape, device="cuda")
        for t in range(num):
            buffer.push(m, t)
            m = torch.tanh(m)
        del m
        for t in reversed(range(num)):
            if t > 0:
                buffer.prefetch(t - 1)
            state = buffer.get(t)
            del state
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del buffer
        return peak

    def test_device_memory_is_flat_in_capacity_with_offload(self):
        state = state_bytes(torch.float32, (4, 32, 256))
        offloaded = {n: self.peak_device_bytes(n, offload=True) for n in (8, 64, 256)}
        assert offloaded[8] == offloaded[64] == offloaded[256], offloaded
        assert offloaded[256] <= 7 * state  # 4 staging slots and the live states
        resident = {n: self.peak_device_bytes(n, offload=False) for n in (8, 256)}
        assert resident[256] >= 256 * state > resident[8]

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_offload_matches_no_offload(self, dtype):
        states = random_states(12, dtype, "cuda")
        plain = filled(states, "cuda", offload=False)
        offloaded = filled(states, "cuda", offload=True)
        for t in reversed(range(12)):
            offloaded.prefetch(max(t - 1, 0))
            a, b = plain.get(t), offloaded.get(t)
            assert torch.equal(a, b) and torch.equal(b, states[t])
            assert plain.rng_seed(t) == offloaded.rng_seed(t)
        assert torch.equal(plain.pop(), offloaded.pop())

    def test_default_cuda_device_is_resolved(self):
        buffer = ReplayBuffer(1, SHAPE, torch.float32, "cuda", offload=True)
        assert buffer.device == torch.device("cuda", torch.cuda.current_device())
        buffer.push(torch.ones(SHAPE, device="cuda"))
        assert torch.equal(buffer.get(0), torch.ones(SHAPE, device="cuda"))
