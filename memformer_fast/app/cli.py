"""``memformer-fast`` (also ``python -m memformer_fast``): demo, train, eval, generate, export,
info.

A thin layer over :mod:`memformer_fast.app.demo` and :mod:`memformer_fast.app.training`: it
parses flags, turns a bad flag or a :class:`~memformer_fast.app.errors.UserError` into a one-line
message with exit status 2, and Ctrl-C, SIGTERM or SIGHUP into status 128 + the signal's number
(130, 143, 129) after ``train`` has saved a resumable checkpoint.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import importlib
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

from .. import __version__
from ..config import ARCHITECTURES, BACKENDS, MemformerConfig
from ..presets import preset
from .checkpoint import CHECKPOINT_NAME
from .data import VOCAB_SIZE, ByteData, load_documents
from .demo import SIZES
from .errors import UserError
from .settings import TrainSettings
from .signals import Stopped, signals_deferred, signals_stop

PROG = "memformer-fast"


def _device(name: str) -> str:
    """``--device``: auto, cpu, cuda or cuda:N, checked against this machine."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(
            f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N"
        ) from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: only cpu and cuda are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available here (try --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    return name


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


# Flag types: a bad value becomes one line from the parser (see _Parser.error), exit status 2.


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = _integer(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"int >= {low}"
    return parse


POSITIVE, NON_NEGATIVE = _at_least(1), _at_least(0)


def _threads(text: str) -> int:
    """``--threads``: 1 to the machine's CPU count (torch.set_num_threads(100000) crashes the
    process: thread creation fails inside the OpenMP runtime)."""
    value = POSITIVE(text)
    cpus = os.cpu_count() or 1
    if value > cpus:
        raise argparse.ArgumentTypeError(
            f"must be at most {cpus} (the CPUs of this machine), got {value}"
        )
    return value


MAX_SEED = 2**63 - 1


def _seed(text: str) -> int:
    value = _integer(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**63 - 1], got {value}")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# ---------------------------------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoOptions, run_demo

    device = _device(args.device)
    # The small model's operations are too small to split across threads: one thread is faster
    # and does not fight other processes for the cores.
    threads = args.threads or (1 if device == "cpu" and args.size == "small" else None)
    _set_threads(threads)
    options = DemoOptions(
        size=args.size,
        segments=args.segments,
        batch_size=args.batch_size,
        steps_per_stage=args.steps_per_stage,
        key_copies=args.key_copies,
        seed=args.seed,
        device=device,
        backend=args.backend,
        measure_memory=not args.no_memory_probe,
        out_dir=args.out,
        reach_lengths=args.reach,
    )
    print(
        f"{PROG} demo: train a Memformer with MRBP to recall a key across "
        f"{options.num_segments} segments (seed {args.seed}, {device})",
        flush=True,
    )
    start = time.perf_counter()
    report = run_demo(options, progress=not args.no_progress)
    wall = time.perf_counter() - start
    print(report.table(extra=[("wall time (all of the above)", f"{wall:.0f} s")]))
    return 0


def _segment_lengths(text: str) -> tuple[int, ...]:
    """``"16,256,4096"`` -> ``(16, 256, 4096)``; each a number of segments >= 2."""
    try:
        lengths = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers of segments, got {text!r}"
        ) from None
    if any(t < 2 for t in lengths):
        raise argparse.ArgumentTypeError(f"every length must be >= 2 segments, got {text!r}")
    return lengths


# --------------------------------------------------------------------------------------- train

# The model of a new `train` run, as MemformerConfig fields; d_ff defaults to 4 * d_model.
DEFAULT_MODEL: dict[str, Any] = preset("byte-lm")
# Model flags -> config fields. Their argparse default is None ("not given"), so a resumed run can
# tell a conflicting flag from a default.
MODEL_FLAGS = {
    "architecture": ("architecture",),
    "d_model": ("d_model",),
    "n_heads": ("n_heads",),
    "layers": ("n_decoder_layers", "n_encoder_layers"),
    "d_ff": ("d_ff",),
    "slots": ("n_memory_slots",),
    "segment_length": ("segment_length",),
    "dropout": ("dropout",),
    "backend": ("backend",),
}
SETTING_FLAGS = (
    "batch_size",
    "segments",
    "steps",
    "lr",
    "warmup_steps",
    "grad_clip_factor",
    "eval_every",
    "eval_bytes",
    "save_every",
    "val_fraction",
    "seed",
    "reset_at_file_boundaries",
    "memory_reset_every_segment",
    "compile",
)


def _model_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The explicitly given model flags as :class:`MemformerConfig` fields."""
    fields: dict[str, Any] = {}
    for flag, names in MODEL_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            fields.update(dict.fromkeys(names, value))
    return fields


def _new_run(
    model_fields: dict[str, Any], overrides: dict[str, Any]
) -> tuple[MemformerConfig, TrainSettings]:
    """The config and settings of a new ``train`` run: the defaults with the given flags."""
    fields = {**DEFAULT_MODEL, **model_fields}
    fields.setdefault("d_ff", 4 * fields["d_model"])
    try:
        config = MemformerConfig(vocab_size=VOCAB_SIZE, **fields)
    except ValueError as error:
        raise UserError(str(error)) from None
    return config, TrainSettings(**overrides)


def _byte_data(
    documents: list[bytes], corpus: bytes, config: MemformerConfig, settings: TrainSettings
) -> ByteData:
    """The run's data: ``corpus`` (the ``documents`` joined) as one byte stream, or the documents
    aligned to segments (``--reset-at-file-boundaries``), in rollouts the model can learn from
    (the encoder-decoder predicts segment t + 1: two segments at least)."""
    if config.architecture == "encoder-decoder" and settings.segments < 2:
        raise UserError(
            f"--segments must be >= 2 with --architecture encoder-decoder (segment t predicts "
            f"segment t + 1), got {settings.segments}"
        )
    rollout_bytes = settings.segments * config.segment_length
    if settings.reset_at_file_boundaries:
        return ByteData.from_documents(
            documents, config.segment_length, rollout_bytes, settings.val_fraction
        )
    return ByteData.from_bytes(corpus, rollout_bytes, settings.val_fraction)


def cmd_train(args: argparse.Namespace) -> int:
    from .disk import check_output_dir, output_dir_locked

    device = _device(args.device)
    _set_threads(args.threads)
    out = Path(args.out)
    check_output_dir(out)  # before any work: a folder that cannot be written loses the run
    with output_dir_locked(out):  # one run per folder: a second one fails here, saying who
        return _train(args, device, out)


def _train(args: argparse.Namespace, device: str, out: Path) -> int:
    """``train`` on ``out``, which this process holds (:func:`cmd_train`)."""
    from .checkpoint import load_checkpoint
    from .disk import check_output_dir
    from .settings import resumed_config, resumed_settings
    from .training import Trainer

    path = out / CHECKPOINT_NAME
    overrides = {k: getattr(args, k) for k in SETTING_FLAGS if getattr(args, k) is not None}
    model_fields = _model_overrides(args)
    documents = load_documents(args.data, args.glob, args.max_bytes)
    corpus, n_files = b"".join(documents), len(documents)
    ckpt = load_checkpoint(path) if args.resume else None
    if ckpt is not None:
        config = resumed_config(ckpt, model_fields)
        settings = resumed_settings(ckpt, overrides)
    else:
        if path.exists():
            raise UserError(
                f"{path} exists: pass --resume to continue that run, or choose another --out"
            )
        config, settings = _new_run(model_fields, overrides)
    data = _byte_data(documents, corpus, config, settings)
    if ckpt is not None:
        trainer = Trainer.resume(ckpt, data, settings, device)
    else:
        trainer = Trainer.create(config, data, settings, device)
    check_output_dir(out, trainer.checkpoint_bytes_estimate())
    n_params = sum(p.numel() for p in trainer.model.parameters())
    print(
        f"{PROG} train: {n_files} file(s), {len(corpus):,} bytes "
        f"({len(data.train):,} train, {len(data.val):,} held out); {n_params / 1e6:.2f}M "
        f"parameters, {config.architecture}; rollout {settings.segments} x "
        f"{config.segment_length} bytes, batch {settings.batch_size}; {device}"
        + ("; memory reset at file starts" if settings.reset_at_file_boundaries else "")
        + ("; memory reset every segment" if settings.memory_reset_every_segment else "")
        + (f"; resuming at step {trainer.step}" if args.resume else ""),
        flush=True,
    )
    if trainer.step >= settings.steps:
        print(f"already at step {trainer.step} >= --steps {settings.steps}: nothing to do")
        return 0
    status = trainer.train(path, progress=not args.no_progress)
    if status == "interrupted":
        signum = trainer.stop_signal or 2
        with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone
            print(
                f"\n{signal_name(signum)}: saved step {trainer.step} to {path}; continue with the "
                "same command plus --resume",
                file=sys.stderr,
            )
        return 128 + signum
    last = trainer.history[-1] if trainer.history else None
    summary = f", held-out {last['bits_per_byte']:.3f} bits/byte" if last else ""
    print(f"done: step {trainer.step}{summary}; checkpoint {path}")
    return 0


# ---------------------------------------------------------------------------------------- eval


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from .checkpoint import load_checkpoint, model_from_checkpoint
    from .evaluation import evaluate_documents, format_evaluation

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_bytes is not None and args.max_bytes < 1:
        raise UserError(f"--max-bytes must be >= 1, got {args.max_bytes}")
    json_path = None if args.json is None else _check_json_path(args.json)
    device = _device(args.device)
    _set_threads(args.threads)
    ckpt = load_checkpoint(args.checkpoint)
    model = model_from_checkpoint(ckpt, device)
    documents: list[bytes] = []
    for path in args.text:
        left = None if args.max_bytes is None else args.max_bytes - sum(map(len, documents))
        if left is not None and left <= 0:
            break
        documents += load_documents(path, args.glob, left)
    n_params = sum(p.numel() for p in model.parameters())
    c = model.config
    _say(
        f"{PROG} eval: {ckpt['path']} (step {ckpt['step']}, {n_params / 1e6:.2f}M parameters, "
        f"{c.architecture}, segments of {c.segment_length} bytes) on {len(documents)} file(s), "
        f"{sum(map(len, documents)):,} bytes; {device}"
    )
    start = time.perf_counter()
    report = evaluate_documents(model, documents, args.batch_size, progress=not args.no_progress)
    report = {
        "checkpoint": ckpt["path"],
        "step": int(ckpt["step"]),
        "parameters": n_params,
        "config": c.to_dict(),
        "text": [str(p) for p in args.text],
        "seconds": round(time.perf_counter() - start, 1),
        **report,
    }
    _say(format_evaluation(report))
    if json_path is not None:
        _write_atomically(json_path, (json.dumps(report, indent=2) + "\n").encode(), "--json")
        _say(f"wrote {json_path}")
    return 0


def _say(text: str) -> None:
    """Print a line of a report; once the reader is gone (``| head``), stop printing and carry on
    (the --json report is still written): stdout is pointed at /dev/null, so the flush at exit
    cannot fail either."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())


def _check_json_path(text: str) -> Path:
    """``--json``: a file that can be written (its folder may not exist yet), checked before the
    evaluation, not after it."""
    from .disk import check_output_dir

    path = Path(text)
    if path.is_dir():
        raise UserError(f"--json {text} is a folder: name a file")
    existing = next(p for p in path.absolute().parents if p.exists())
    if not existing.is_dir():
        raise UserError(f"--json {text}: {existing} is a file, not a folder")
    check_output_dir(path.parent, flag="--json")
    return path


def _write_atomically(path: Path, data: bytes, flag: str) -> None:
    """Write ``data`` to ``path`` through a temporary file in its folder, renamed over it once
    complete: a full disk or a signal never leaves a partial file."""
    from .disk import os_reason, write_file

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with signals_deferred():
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                write_file(tmp, memoryview(data))
                os.replace(tmp, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
    except OSError as error:
        raise UserError(f"could not write {flag} {path}: {os_reason(error, flag)}") from None


# ------------------------------------------------------------------------------------ generate


def cmd_generate(args: argparse.Namespace) -> int:
    from .checkpoint import load_model
    from .evaluation import stream_bytes

    device = _device(args.device)
    # One token at a time is too little work to split across threads: one is fastest on a CPU.
    _set_threads(args.threads or (1 if torch.device(device).type == "cpu" else None))
    try:  # argv arrives decoded with surrogateescape: this gives back the bytes as typed
        prompt = os.fsencode(args.prompt)
    except UnicodeEncodeError as error:
        raise UserError(f"--prompt cannot be encoded as bytes: {error.reason}") from None
    model = load_model(args.checkpoint, device)
    top_k = args.top_k if args.top_k > 0 else None
    # Printed as UTF-8 text, invalid sequences replaced (what a terminal shows anyway); the
    # model itself sees and continues the exact bytes.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = sys.stdout
    try:
        out.write(decoder.decode(prompt))
        out.flush()
        for byte in stream_bytes(model, prompt, args.max_bytes, args.temperature, top_k, args.seed):
            text = decoder.decode(bytes([byte]))
            if text:
                out.write(text)
                out.flush()
        out.write(decoder.decode(b"", final=True) + "\n")
        out.flush()
    except BrokenPipeError:  # the reader is gone (`| head`): stop quietly
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # so the flush at exit does not fail too
    return 0


# ---------------------------------------------------------------------------------------- info


def cmd_info(args: argparse.Namespace) -> int:
    from .. import backends, replay

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    rows = [
        ("memformer_fast", __version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("triton", triton_version),
        ("platform", platform.platform()),
        ("cpu", f"{os.cpu_count()} cores, torch uses {torch.get_num_threads()}"),
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            rows.append(
                (f"cuda:{i}", f"{p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
            )
        rows.append(("cuda runtime", str(torch.version.cuda)))
    else:
        rows.append(("cuda", "not available"))
    triton_ok = backends.triton_available()
    kernels = (
        "available (CUDA)"
        if triton_ok and torch.cuda.is_available()
        else "available (CPU interpreter, TRITON_INTERPRET=1)"
        if triton_ok and backends.interpreter_enabled()
        else "installed; needs CUDA (or TRITON_INTERPRET=1)"
        if triton_ok
        else "not available (pip install triton)"
    )
    auto = backends.resolve_backend("auto", torch.device(_device("auto")))
    rows += [
        ("backend reference", "available"),
        ("backend triton", kernels),
        ("backend auto ->", auto),
    ]
    build_info = getattr(replay, "build_info", None)
    if build_info is None:
        rows.append(("extension _C", "not available (this version has no build_info)"))
    else:
        info = build_info()
        if info.get("extension_built"):
            cuda = (
                "with CUDA " + ",".join(info.get("cuda_archs") or [])
                if info.get("with_cuda")
                else "CPU only"
            )
            rows.append(("extension _C", f"built, {cuda}"))
        else:
            rows.append(("extension _C", f"not built: {info.get('extension_error')}"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    return 0


# -------------------------------------------------------------------------------------- export


def cmd_export(args: argparse.Namespace) -> int:
    try:
        importlib.import_module("memformer_fast.hf")  # transformers is optional
    except ImportError:
        raise UserError('export needs transformers: pip install "memformer_fast[hf]"') from None
    from .export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out_dir)
    print(
        f"wrote {out}: AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True) "
        "loads it (so does AutoTokenizer); with memformer_fast installed, nothing to import"
    )
    return 0


# -------------------------------------------------------------------------------------- parser


# Defaults of a new `train` run (a resumed run takes its checkpoint's), quoted in the help.
_SETTINGS = TrainSettings()
DEVICE_HELP = "auto (cuda when available, else cpu), cpu, cuda or cuda:N (default auto)"
BACKEND_HELP = (
    "kernels: auto (Triton on CUDA, the PyTorch reference elsewhere), reference or triton "
    "(default auto)"
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Memformer (memory-augmented Transformer) trained with Memory Replay "
        "Back-Propagation.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {__version__}",
        help="print the version and exit",
    )
    sub = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="COMMAND",
        help=f"one of these; `{PROG} COMMAND --help` lists its flags",
    )
    _add_demo(sub)
    _add_train(sub)
    _add_eval(sub)
    _add_generate(sub)
    _add_export_and_info(sub)
    return parser


def _add_demo(sub: Any) -> None:
    """The ``demo`` command."""
    demo = sub.add_parser(
        "demo",
        help="long-range recall: train with MRBP, compare with the memory reset (a few minutes)",
        description="Train a small Memformer with MRBP to recall a key seen many segments "
        "earlier; compare it on held-out sequences with the same model with its memory reset; "
        "report throughput and the peak memory of MRBP vs full BPTT; plot the learning curves.",
    )
    demo.add_argument(
        "--size",
        choices=tuple(SIZES),
        default="small",
        help="small: 16 segments; on 2 CPU cores a few minutes of training and evaluation, "
        "then a few minutes for --reach; large: a wider, deeper model on 32 "
        "segments of 32 tokens (a GPU is advised) (default small)",
    )
    demo.add_argument(
        "--segments",
        type=_at_least(2),
        help="segments per sequence (default 16 for --size small, 32 for large)",
    )
    demo.add_argument(
        "--batch-size", type=POSITIVE, default=32, help="sequences per update (default 32)"
    )
    demo.add_argument(
        "--steps-per-stage",
        type=POSITIVE,
        default=100,
        help="updates per curriculum stage (2, 4, 8, ... segments; the last gets twice as "
        "many; default 100)",
    )
    demo.add_argument(
        "--key-copies",
        type=POSITIVE,
        default=1,
        help="start with a stage of two segments holding this many marker-key pairs (easier; "
        "default 1: a single key from the start)",
    )
    demo.add_argument(
        "--seed", type=_seed, default=0, help="seed of the model, the data and dropout (default 0)"
    )
    demo.add_argument("--device", default="auto", help=DEVICE_HELP)
    demo.add_argument("--backend", choices=BACKENDS, default="auto", help=BACKEND_HELP)
    demo.add_argument(
        "--threads",
        type=_threads,
        help="CPU threads (default: 1 for --size small on the CPU, else torch's default)",
    )
    demo.add_argument(
        "--out", default="runs/demo", help="folder for the plot and report.json (default runs/demo)"
    )
    demo.add_argument(
        "--no-memory-probe",
        action="store_true",
        help="skip measuring the peak memory of MRBP vs BPTT",
    )
    demo.add_argument(
        "--reach",
        type=_segment_lengths,
        default=(16, 256, 4096),
        help="comma-separated rollout lengths at which to measure recall after training, "
        "streamed at constant memory (default 16,256,4096; an empty string skips it)",
    )
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(func=cmd_demo)


def _add_train(sub: Any) -> None:
    """The ``train`` command: data, model and run flags."""
    train = sub.add_parser(
        "train",
        help="train a byte-level language model on a text file or folder",
        description="Train a byte-level Memformer language model with MRBP. Evaluates bits per "
        "byte on a held-out split, saves OUT/checkpoint.pt periodically and on Ctrl-C; "
        "--resume continues exactly where it stopped.",
    )
    train.add_argument("data", help="a text file, or a folder (its text files, recursively)")
    train.add_argument(
        "--glob", help="only files whose name matches, e.g. '*.py' (default: every text file)"
    )
    train.add_argument(
        "--max-bytes", type=POSITIVE, help="read at most this many bytes (default: all)"
    )
    train.add_argument(
        "--out", default="runs/train", help="folder of checkpoint.pt (default runs/train)"
    )
    train.add_argument("--resume", action="store_true", help="continue OUT/checkpoint.pt")
    _add_train_model_flags(train)
    _add_train_settings(train)
    train.add_argument("--device", default="auto", help=DEVICE_HELP)
    train.add_argument("--threads", type=_threads, help="CPU threads (default: torch's)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=cmd_train)


def _add_train_model_flags(train: argparse.ArgumentParser) -> None:
    """``train``'s model flags (a new run's defaults: the ``byte-lm`` preset)."""
    g = train.add_argument_group("model (fixed once a run has started)")
    g.add_argument(
        "--architecture",
        choices=sorted(ARCHITECTURES),
        help=f"default {DEFAULT_MODEL['architecture']}",
    )
    g.add_argument("--d-model", type=POSITIVE, help=f"width (default {DEFAULT_MODEL['d_model']})")
    g.add_argument("--n-heads", type=POSITIVE, help=f"default {DEFAULT_MODEL['n_heads']}")
    g.add_argument(
        "--layers", type=POSITIVE, help=f"layers (default {DEFAULT_MODEL['n_decoder_layers']})"
    )
    g.add_argument("--d-ff", type=POSITIVE, help="feed-forward width (default 4 x --d-model)")
    g.add_argument(
        "--slots", type=POSITIVE, help=f"memory slots (default {DEFAULT_MODEL['n_memory_slots']})"
    )
    g.add_argument(
        "--segment-length",
        type=POSITIVE,
        help=f"bytes per segment (default {DEFAULT_MODEL['segment_length']})",
    )
    g.add_argument(
        "--dropout", type=_non_negative_float, help=f"default {DEFAULT_MODEL['dropout']}"
    )
    g.add_argument("--backend", choices=BACKENDS, help=BACKEND_HELP)


def _add_train_settings(train: argparse.ArgumentParser) -> None:
    """``train``'s run settings (a new run's defaults: :class:`TrainSettings`)."""
    t = train.add_argument_group("training (defaults: the checkpoint's when resuming)")
    t.add_argument(
        "--batch-size", type=POSITIVE, help=f"parallel streams (default {_SETTINGS.batch_size})"
    )
    t.add_argument(
        "--segments",
        type=POSITIVE,
        help=f"segments per MRBP rollout (default {_SETTINGS.segments})",
    )
    t.add_argument("--steps", type=NON_NEGATIVE, help=f"total updates (default {_SETTINGS.steps})")
    t.add_argument("--lr", type=_finite, help=f"peak learning rate (default {_SETTINGS.lr})")
    t.add_argument(
        "--warmup-steps",
        type=NON_NEGATIVE,
        help=f"linear warm-up updates (default {_SETTINGS.warmup_steps})",
    )
    t.add_argument(
        "--grad-clip-factor",
        type=_non_negative_float,
        help="clip the gradient norm to this many times the mean of the recent norms as well as "
        "to 1.0, so one batch's spike cannot undo a solved model (default "
        f"{_SETTINGS.grad_clip_factor}; 0: fixed limit only)",
    )
    t.add_argument(
        "--eval-every",
        type=POSITIVE,
        help=f"updates between evaluations (default {_SETTINGS.eval_every})",
    )
    t.add_argument(
        "--eval-bytes",
        type=POSITIVE,
        help=f"held-out bytes per evaluation (default {_SETTINGS.eval_bytes})",
    )
    t.add_argument(
        "--save-every",
        type=POSITIVE,
        help=f"updates between checkpoints (default {_SETTINGS.save_every})",
    )
    t.add_argument(
        "--val-fraction",
        type=_finite,
        help=f"held-out share of the data (default {_SETTINGS.val_fraction})",
    )
    t.add_argument(
        "--seed",
        type=_seed,
        help=f"seed of the model, the data order and dropout (default {_SETTINGS.seed})",
    )
    t.add_argument(
        "--reset-at-file-boundaries",
        action="store_true",
        default=None,
        help="start every file on a segment with a fresh memory, and predict no byte from "
        "another file (files are documents)",
    )
    t.add_argument(
        "--memory-reset-every-segment",
        action="store_true",
        default=None,
        help="the no-memory baseline: reset the memory before every segment (same model, same "
        "parameter count)",
    )
    t.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="run each segment's MRBP step through torch.compile (inductor; the first steps "
        "compile, later ones are faster when the step is bound by launches; same gradients up "
        "to float rounding)",
    )


def _add_eval(sub: Any) -> None:
    """The ``eval`` command."""
    ev = sub.add_parser(
        "eval",
        help="bits per byte on held-out text: memory carried vs reset, by position in the file",
        description="Evaluate a checkpoint on held-out text files (each file is a document that "
        "starts with a fresh memory): bits per byte with the memory carried from segment to "
        "segment, with the memory reset before every segment, and both by the index of the "
        "segment within its file, so you see what the memory buys as the context grows.",
    )
    ev.add_argument("checkpoint", help="a checkpoint file, or the --out folder of `train`")
    ev.add_argument("text", nargs="+", help="text files or folders (their text files, recursively)")
    ev.add_argument(
        "--glob", help="only files whose name matches, e.g. '*.py' (default: every text file)"
    )
    ev.add_argument(
        "--max-bytes", type=int, help="read at most this many bytes in all (default: all)"
    )
    ev.add_argument(
        "--batch-size", type=int, default=16, help="files evaluated side by side (default 16)"
    )
    ev.add_argument("--json", help="also write the report as JSON to this file (default: none)")
    ev.add_argument("--device", default="auto", help=DEVICE_HELP)
    ev.add_argument("--threads", type=_threads, help="CPU threads (default: torch's)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.set_defaults(func=cmd_eval)


def _add_generate(sub: Any) -> None:
    """The ``generate`` command."""
    gen = sub.add_parser(
        "generate",
        help="stream text from a checkpoint",
        description="Print the bytes a trained model generates after a prompt, as they come, in "
        "constant memory however long the output.",
    )
    gen.add_argument("checkpoint", help="a checkpoint file, or the --out folder of `train`")
    gen.add_argument("--prompt", default="\n", help="text to continue (default '\\n': a newline)")
    gen.add_argument(
        "--max-bytes", type=NON_NEGATIVE, default=500, help="bytes to generate (default 500)"
    )
    gen.add_argument(
        "--temperature",
        type=_non_negative_float,
        default=0.8,
        help="sampling temperature; 0 = greedy (default 0.8)",
    )
    gen.add_argument(
        "--top-k",
        type=NON_NEGATIVE,
        default=40,
        help="sample among the k likeliest bytes; 0 = no top-k filtering (default 40)",
    )
    gen.add_argument("--seed", type=_seed, default=0, help="sampling seed (default 0)")
    gen.add_argument("--device", default="auto", help=DEVICE_HELP)
    gen.add_argument("--threads", type=_threads, help="CPU threads (default: 1 on the CPU)")
    gen.set_defaults(func=cmd_generate)


def _add_export_and_info(sub: Any) -> None:
    """The ``export`` and ``info`` commands."""
    export = sub.add_parser(
        "export",
        help="convert a train checkpoint to a Hugging Face model folder (needs [hf])",
        description="Write a checkpoint as config.json, model.safetensors, the byte-level "
        "tokenizer and modeling_memformer.py (which imports the installed memformer_fast): "
        "AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True) and "
        "AutoTokenizer.from_pretrained(DIR, trust_remote_code=True) load it in any process.",
    )
    export.add_argument("checkpoint", help="a checkpoint file, or the --out folder of `train`")
    export.add_argument("out_dir", metavar="DIR", help="output folder (new or empty)")
    export.set_defaults(func=cmd_export)
    info = sub.add_parser(
        "info",
        help="versions, devices, backends and the compiled extension",
        description="Print the versions of memformer_fast, Python, torch and triton, the "
        "platform, the CPU cores and CUDA devices, which kernel backends work here (and which "
        "one backend auto picks), and whether the replay-buffer extension memformer_fast._C is "
        "built, with CUDA (for which architectures) or for the CPU only.",
    )
    info.set_defaults(func=cmd_info)


def signal_name(signum: int) -> str:
    return {2: "interrupted", 15: "terminated (SIGTERM)", 1: "hung up (SIGHUP)"}.get(
        signum, f"stopped by signal {signum}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``memformer-fast``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        with signals_stop():  # SIGTERM and SIGHUP stop a command as Ctrl-C does
            return int(args.func(args))
    except UserError as error:
        print(f"{PROG} {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        signum = stop.signum if isinstance(stop, Stopped) else 2
        with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone
            print(f"\n{PROG} {args.command}: {signal_name(signum)}", file=sys.stderr)
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
