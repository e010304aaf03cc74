"""The Hugging Face integration (``memformer_fast.hf``): config, model, cache, generate(),
save/load, export, MRBPTrainer. Skipped where ``transformers`` is not installed."""

from __future__ import annotations

import copy
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from testing_utils import relative_error, tiny_config, tiny_model  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    TrainingArguments,
)
from transformers.generation.streamers import BaseStreamer  # noqa: E402

import memformer_fast  # noqa: E402
from memformer_fast import Memformer, MemformerConfig, mrbp  # noqa: E402
from memformer_fast.app.cli import main  # noqa: E402
from memformer_fast.app.data import VOCAB_SIZE, ByteData  # noqa: E402
from memformer_fast.app.training import Trainer as ByteTrainer  # noqa: E402
from memformer_fast.app.training import TrainSettings  # noqa: E402
from memformer_fast.hf import (  # noqa: E402
    MemformerCache,
    MemformerForCausalLM,
    MemformerHFConfig,
    MRBPTrainer,
    byte_tokenizer,
    stream_rollouts,
)

ARCHS = ("decoder", "encoder-decoder")
V, L = 23, 5  # tiny_config's vocabulary and segment length


pytestmark = pytest.mark.usefixtures("one_thread")


def wrapped(
    arch: str, seed: int = 0, **overrides: object
) -> tuple[Memformer, MemformerForCausalLM]:
    """A tiny ``Memformer`` in eval mode and its HF wrapper (same weights)."""
    model = tiny_model(arch, seed, **overrides).eval()
    return model, MemformerForCausalLM.from_memformer(model).eval()


def ids(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------ config


def test_config_holds_every_field_once_and_round_trips(tmp_path: Path) -> None:
    import dataclasses

    config = tiny_config("encoder-decoder", memory_dtype=torch.float64, dropout=0.25)
    hf = MemformerHFConfig.from_memformer_config(config)
    assert hf.to_memformer_config() == config
    assert (hf.hidden_size, hf.num_attention_heads) == (16, 2)
    assert hf.tie_word_embeddings is config.tie_embeddings
    hf.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    for field in dataclasses.fields(MemformerConfig):
        assert field.name in saved
    assert saved["memory_dtype"] == "float64" and saved["model_type"] == "memformer"
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, MemformerHFConfig) and loaded.to_memformer_config() == config
    assert MemformerHFConfig().to_memformer_config() == MemformerConfig(vocab_size=256)


def test_config_errors_name_the_field_and_the_model_type(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"d_model \(33\) must be divisible by n_heads"):
        MemformerHFConfig(d_model=33, n_heads=2)
    with pytest.raises(ValueError, match="memory_dtype"):
        MemformerHFConfig(memory_dtype="float77")
    with pytest.raises(ValueError, match="same field"):
        MemformerHFConfig(d_model=32, hidden_size=64)
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        MemformerHFConfig(model_type="gpt2")
    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        MemformerForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(TypeError, match="MemformerHFConfig"):
        MemformerForCausalLM(GPT2Config())  # type: ignore[arg-type]


def test_a_new_model_is_initialised_as_memformer_is() -> None:
    torch.manual_seed(0)
    hf = MemformerForCausalLM(MemformerHFConfig.from_memformer_config(tiny_config("decoder")))
    m = hf.memformer
    assert torch.allclose(m.writer.bias.norm(dim=-1), torch.full((3,), m.config.bias_init_norm))
    assert m.writer.gate is not None
    assert torch.equal(m.writer.gate.bias, torch.full((16,), m.config.gate_bias_init))
    assert torch.equal(m.norm.weight, torch.ones(16)) and torch.equal(m.norm.bias, torch.zeros(16))
    std = m.config.embedding_init_std
    assert m.embed.weight.std().item() == pytest.approx(std, rel=0.2)
    assert (m.lm_head.weight is m.embed.weight) is m.config.tie_embeddings
    fresh = Memformer(tiny_config("decoder"))
    for (name, buffer), other in zip(m.named_buffers(), fresh.buffers()):
        assert torch.equal(buffer, other), name


# ----------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_loss_and_logits_are_the_models(arch: str) -> None:
    model, hf = wrapped(arch)
    x = ids(2, 3 * L + 2)
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[1, -4:] = False  # right padding
    labels = x.clone()
    labels[0, 7] = -100
    out = hf(x, attention_mask=mask, labels=labels)
    expected, _ = model.sequence_loss(x, attention_mask=mask, labels=labels)
    assert relative_error(out.loss, expected) < 1e-6
    assert out.logits.shape == (2, 3 * L + 2, V)
    if arch == "decoder":  # the first segment's logits are the model's own
        first = model(x[:, :L], model.init_memory(2))
        assert relative_error(out.logits[:, :L], first.logits) < 1e-6
    else:  # nothing is predicted inside the first segment; segment 2 is decoded from it
        first = model(x[:, :L], model.init_memory(2), labels=x[:, L : 2 * L])
        assert out.logits[:, : L - 1].isnan().all() and not out.logits[:, L - 1 :].isnan().any()
        assert relative_error(out.logits[:, L - 1 : 2 * L - 1], first.logits) < 1e-6
    broken = copy.deepcopy(hf)
    with torch.no_grad():
        broken.memformer.lm_head.weight[0, 0] = float("nan")
    assert broken(x, labels=x).loss.isnan()  # a diverged model is not hidden by the NaN fill
    with pytest.raises(ValueError, match="no token to predict"):
        hf(x[:, :1], labels=x[:, :1])
    with pytest.raises(ValueError, match="inputs_embeds"):
        hf(x, inputs_embeds=torch.zeros(2, 3, 16))
    with pytest.raises(ValueError, match="input_ids must hold ids in"):
        hf(x + V)


@pytest.mark.parametrize("arch", ARCHS)
def test_cache_continues_the_stream_in_constant_memory(arch: str) -> None:
    _model, hf = wrapped(arch)
    x = ids(2, 4 * L + 3, seed=1)
    whole = hf(x).logits
    cache = MemformerCache()
    pieces = [x[:, :3], x[:, 3:4], x[:, 4:11], *x[:, 11:].split(1, dim=1)]
    stepped = []
    for piece in pieces:
        # transformers' convention: the mask may cover the cached tokens and the new ones
        seen_and_new = torch.ones(2, cache.get_seq_length() + piece.shape[1], dtype=torch.long)
        out = hf(piece, past_key_values=cache, attention_mask=seen_and_new)
        assert out.past_key_values is cache
        stepped.append(out.logits)
        assert cache.length < L and len(cache.hidden) <= L
        assert all(len(kv) <= L for kv in cache.block_caches)
        assert all(len(s) <= L for s, _ in cache.decoder_caches)
    assert cache.get_seq_length() == x.shape[1]
    got = torch.cat(stepped, dim=1)
    if arch == "decoder":
        assert relative_error(got, whole) < 1e-5
    else:  # the first call (3 tokens) wrote a short first segment, as Memformer.stream does
        assert not got[:, -1].isnan().any()


# -------------------------------------------------------------------------------- generation


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("prompt_length", [1, 3, L, 2 * L + 2])
def test_greedy_generate_equals_memformer_generate(arch: str, prompt_length: int) -> None:
    model, hf = wrapped(arch)
    prompt = ids(2, prompt_length, seed=prompt_length)
    expected = model.generate(prompt, 3 * L + 1)
    out = hf.generate(prompt, max_new_tokens=3 * L + 1, do_sample=False)
    assert torch.equal(out[:, :prompt_length], prompt)
    assert torch.equal(out[:, prompt_length:], expected)
    memory = model.init_memory(2) * -1.0  # a carried memory: M_0 of the stream
    assert torch.equal(
        hf.generate(prompt, max_new_tokens=7, do_sample=False, memory=memory)[:, prompt_length:],
        model.generate(prompt, 7, memory=memory),
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_sampling_draws_what_memformer_stream_draws(arch: str) -> None:
    model, hf = wrapped(arch)
    prompt = ids(2, 7)
    torch.manual_seed(3)
    expected = model.generate(prompt, 12, temperature=0.8, top_k=5)
    torch.manual_seed(3)
    out = hf.generate(prompt, max_new_tokens=12, do_sample=True, temperature=0.8, top_k=5)
    assert torch.equal(out[:, 7:], expected)
    # top_p keeps the smallest set of likeliest tokens: a tiny top_p is greedy decoding
    tiny_p = hf.generate(prompt, max_new_tokens=6, do_sample=True, top_p=1e-6, top_k=0)
    assert torch.equal(tiny_p[:, 7:], model.generate(prompt, 6))


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_does_one_positions_work_per_new_token(
    arch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, hf = wrapped(arch)
    m = hf.memformer
    widths: dict[str, list[int]] = {"blocks": [], "decoder": [], "encoder": []}
    run_blocks, decode, read_segment = m._run_blocks, m.decode, m.read_segment

    def spy_blocks(input_ids, *args, **kwargs):
        widths["blocks"].append(input_ids.shape[1])
        return run_blocks(input_ids, *args, **kwargs)

    def spy_decode(decoder_input_ids, *args, **kwargs):
        if decoder_input_ids is not None:
            widths["decoder"].append(decoder_input_ids.shape[1])
        return decode(decoder_input_ids, *args, **kwargs)

    def spy_read(input_ids, *args, **kwargs):
        widths["encoder"].append(input_ids.shape[1])
        return read_segment(input_ids, *args, **kwargs)

    monkeypatch.setattr(m, "_run_blocks", spy_blocks)
    monkeypatch.setattr(m, "decode", spy_decode)
    monkeypatch.setattr(m, "read_segment", spy_read)
    prompt, new = ids(1, 2 * L + 2), 6 * L
    out = hf.generate(prompt, max_new_tokens=new, do_sample=False)
    assert torch.equal(out[:, prompt.shape[1] :], model.generate(prompt, new))
    if arch == "decoder":  # the prompt in segment-sized pieces, then one position per token
        assert widths["blocks"] == [L, L, 2] + [1] * (new - 1)
    else:  # each segment encoded once when complete; the decoder reads one token at a time
        assert widths["encoder"] == [L] * ((2 * L + 2 + new - 1) // L)
        assert max(widths["decoder"]) <= 2 and sum(widths["decoder"]) < 2 * (new + L)


def reference_beam_search(hf: MemformerForCausalLM, prompt: list[int], beams: int, steps: int):
    """Beam search by brute force: every step rescores every beam's whole sequence from scratch
    (no cache), keeps the ``beams`` best (sum of log-probabilities) of all extensions."""
    hyps = [(0.0, prompt)]
    for _ in range(steps):
        batch = torch.tensor([seq for _, seq in hyps])
        logp = hf(batch, use_cache=False).logits[:, -1].double().log_softmax(-1)
        candidates = [
            (score + logp[i, tok].item(), [*seq, tok])
            for i, (score, seq) in enumerate(hyps)
            for tok in range(V)
        ]
        hyps = sorted(candidates, key=lambda c: -c[0])[:beams]
    return hyps


@pytest.mark.parametrize("arch", ARCHS)
def test_beam_search_reorders_the_memory_with_the_beams(arch: str) -> None:
    _model, hf = wrapped(arch)
    prompt = ids(2, L + 2, seed=5)
    steps, beams = 5, 3  # crosses a segment boundary: the memory is written per beam
    out = hf.generate(
        prompt,
        max_new_tokens=steps,
        num_beams=beams,
        do_sample=False,
        length_penalty=0.0,
        output_scores=True,
        return_dict_in_generate=True,
    )
    for row in range(2):
        best = reference_beam_search(hf, prompt[row].tolist(), beams, steps)[0]
        assert out.sequences[row].tolist() == best[1]
        assert out.sequences_scores[row].item() == pytest.approx(best[0], abs=1e-4)


def test_beam_search_as_wide_as_the_vocabulary_is_exhaustive() -> None:
    _model, hf = wrapped("decoder")
    prompt = ids(1, L - 1, seed=6)  # the second new token starts a new segment
    out = hf.generate(prompt, max_new_tokens=2, num_beams=V, do_sample=False, length_penalty=0.0)
    pairs = torch.cartesian_prod(torch.arange(V), torch.arange(V))
    seqs = torch.cat([prompt.expand(len(pairs), -1), pairs], dim=1)
    logp = hf(seqs, use_cache=False).logits.double().log_softmax(-1)
    scores = logp[:, -3].gather(1, pairs[:, :1])[:, 0] + logp[:, -2].gather(1, pairs[:, 1:])[:, 0]
    assert out[0, -2:].tolist() == pairs[scores.argmax()].tolist()


def test_streamer_receives_the_prompt_then_each_token() -> None:
    class Collect(BaseStreamer):
        def __init__(self) -> None:
            self.chunks: list[list[int]] = []

        def put(self, value: torch.Tensor) -> None:
            self.chunks.append(value.flatten().tolist())

        def end(self) -> None:
            self.chunks.append([])

    model, hf = wrapped("encoder-decoder")
    prompt = ids(1, 4)
    streamer = Collect()
    out = hf.generate(prompt, max_new_tokens=8, do_sample=False, streamer=streamer)
    assert streamer.chunks[0] == prompt[0].tolist() and streamer.chunks[-1] == []
    generated = [token for chunk in streamer.chunks[1:-1] for token in chunk]
    assert generated == out[0, 4:].tolist() == model.generate(prompt, 8)[0].tolist()


def test_padded_batches_are_refused_equal_lengths_batch() -> None:
    _model, hf = wrapped("decoder")
    prompt = ids(2, 6)
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0
    with pytest.raises(ValueError, match="padded prompts"):
        hf.generate(prompt, attention_mask=mask, max_new_tokens=3)
    padded = hf(prompt, attention_mask=mask).past_key_values  # a padded forward is fine ...
    with pytest.raises(ValueError, match="built from a padded input"):
        hf(prompt[:, :1], past_key_values=padded)  # ... but its cache cannot be continued
    cache = hf(prompt[:, :3]).past_key_values  # inside a segment: no key mask for the cache
    with pytest.raises(ValueError, match="only where a segment starts"):
        hf(
            prompt[:, 3:],
            past_key_values=cache,
            attention_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]),
        )
    assert cache.get_seq_length() == 3 and not cache.padded  # nothing changed
    with pytest.raises(ValueError, match="output_attentions=True"):
        hf(prompt, output_attentions=True)
    batch = hf.generate(prompt, max_new_tokens=4, do_sample=False)
    for row in range(2):
        alone = hf.generate(prompt[row : row + 1], max_new_tokens=4, do_sample=False)
        assert torch.equal(batch[row : row + 1], alone)


# ----------------------------------------------------------------------------- save and load


@pytest.mark.parametrize("tie,rotary", [(True, False), (False, False), (False, True)])
def test_save_pretrained_round_trip_is_exact_and_backend_independent(
    tie: bool, rotary: bool, tmp_path: Path
) -> None:
    from safetensors import safe_open

    _model, hf = wrapped("decoder", tie_embeddings=tie, write_rotary=rotary)
    hf.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert ("memformer.lm_head.weight" in keys) is not tie  # a tied weight is stored once
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, MemformerForCausalLM)
    assert (loaded.memformer.lm_head.weight is loaded.memformer.embed.weight) is tie
    own, other = hf.state_dict(), loaded.state_dict()
    assert own.keys() == other.keys() and all(torch.equal(own[k], other[k]) for k in own)
    for (name, buffer), (_, fresh) in zip(hf.named_buffers(), loaded.named_buffers()):
        assert torch.equal(buffer, fresh), name  # the rotary frequencies (writer's too) rebuilt
    x = ids(2, 2 * L + 1)
    assert torch.equal(loaded(x).logits, hf(x).logits)
    triton = MemformerForCausalLM.from_pretrained(tmp_path, backend="triton").eval()
    assert triton.memformer.config.backend == "triton"
    assert relative_error(triton(x[:1, :L]).logits, hf(x[:1, :L]).logits) < 1e-4


def test_loading_a_checkpoint_of_another_shape_fails_clearly(tmp_path: Path) -> None:
    hf = wrapped("decoder")[1]
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "d_ff": 48}))
    mismatch = r"blocks.0.ff.0.weight: expected shape \[48, 16\], got \[32, 16\]"
    with pytest.raises(RuntimeError, match=mismatch):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_decoder_layers": 3}))
    with pytest.raises(RuntimeError, match=r"missing keys: \['memformer.blocks.2"):
        MemformerForCausalLM.from_pretrained(tmp_path)
    loose = MemformerForCausalLM.from_pretrained(tmp_path, strict=False)
    assert len(loose.memformer.blocks) == 3  # the new block initialised as Memformer does
    new = loose.memformer.blocks[2]
    assert torch.equal(new.attn_norm.weight, torch.ones(16)) and new.ff[0].weight.std() > 0
    assert torch.equal(new.attn.inv_freq, loose.memformer.blocks[0].attn.inv_freq)
    assert all(torch.isfinite(p).all() for p in loose.parameters())


def test_export_cli_writes_a_folder_auto_classes_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "hf"
    assert main(["export", str(byte_checkpoint(tmp_path / "run")), str(out_dir)]) == 0
    assert "wrote" in capsys.readouterr().out
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    prompt = "héllo\n\tdef "
    encoded = tokenizer(prompt, return_tensors="pt").input_ids
    assert encoded[0].tolist() == list(prompt.encode())
    assert tokenizer.decode(encoded[0]) == prompt
    loaded = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    from memformer_fast.app.training import load_model

    original = load_model(tmp_path / "run")
    out = loaded.generate(encoded, max_new_tokens=10, do_sample=False)
    assert torch.equal(out[:, encoded.shape[1] :], original.generate(encoded, 10))
    assert main(["export", str(tmp_path / "run"), str(out_dir)]) == 2  # not empty
    assert "not an empty folder" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


# What a Hugging Face user runs in a fresh process: nothing of this package is imported by hand.
_REMOTE_CODE_USER = """
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, prompt = sys.argv[1], sys.argv[2]
assert "memformer_fast" not in sys.modules
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
ids = tokenizer(prompt, return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=10, do_sample=False)
print(json.dumps({"class": type(model).__name__, "tokens": out[0, ids.shape[1]:].tolist()}))
"""


def test_export_loads_with_trust_remote_code_in_a_fresh_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The export carries ``auto_map`` and a module that imports the installed package, so
    ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` loads it in a process
    that never imported ``memformer_fast``, and generates the checkpoint's own tokens."""
    out_dir = tmp_path / "hf"
    assert main(["export", str(byte_checkpoint(tmp_path / "run")), str(out_dir)]) == 0
    capsys.readouterr()
    config = json.loads((out_dir / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "modeling_memformer.MemformerHFConfig",
        "AutoModelForCausalLM": "modeling_memformer.MemformerForCausalLM",
    }
    assert "from memformer_fast.hf import" in (out_dir / "modeling_memformer.py").read_text()
    # The package this test imports, importable there as it is here (installed or from a checkout);
    # transformers' module cache in tmp_path, nothing fetched.
    package_root = str(Path(memformer_fast.__file__).resolve().parent.parent)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([package_root, *filter(None, [env.get("PYTHONPATH")])])
    prompt = "def f("
    proc = subprocess.run(
        [sys.executable, "-c", _REMOTE_CODE_USER, str(out_dir), prompt],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Do you wish to run the custom code" not in proc.stderr + proc.stdout
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    from memformer_fast.app.training import load_model

    prompt_ids = torch.tensor([list(prompt.encode())])
    expected = load_model(tmp_path / "run").eval().generate(prompt_ids, 10)
    assert got == {"class": "MemformerForCausalLM", "tokens": expected[0].tolist()}


def byte_checkpoint(folder: Path) -> Path:
    """A ``memformer-fast train`` checkpoint of a tiny byte model, in ``folder``."""
    config = MemformerConfig(
        vocab_size=VOCAB_SIZE, d_model=32, n_heads=2, d_ff=64, n_decoder_layers=1,
        n_memory_slots=4, segment_length=8, architecture="decoder", backend="reference",
    )  # fmt: skip
    text = b"def f(x):\n    return x + 1\n" * 40
    settings = TrainSettings(batch_size=2, segments=2, steps=1, warmup_steps=1)
    ByteTrainer.create(config, ByteData.from_bytes(text, 16, 0.1), settings).save(
        folder / "checkpoint.pt"
    )
    return folder


def test_export_is_all_or_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk or Ctrl-C during ``export`` leaves no partial folder to block the rerun
    ("exists and is not an empty folder"), and a read-only or full disk gives one line, not a
    traceback: the folder is written under a hidden name and renamed into place when complete."""
    import errno
    import os

    run_dir = byte_checkpoint(tmp_path / "run")
    out_dir = tmp_path / "exports" / "hf"
    real = MemformerForCausalLM.save_pretrained

    def full_disk(self, folder, *args, **kwargs):  # half the weights, then ENOSPC
        (Path(folder) / "model.safetensors").write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def interrupted(self, folder, *args, **kwargs):
        real(self, folder, *args, **kwargs)
        raise KeyboardInterrupt

    for failure, code, says in ((full_disk, 2, "No space left on device"),
                                (interrupted, 130, "interrupted")):  # fmt: skip
        monkeypatch.setattr(MemformerForCausalLM, "save_pretrained", failure)
        assert main(["export", str(run_dir), str(out_dir)]) == code
        err = capsys.readouterr().err
        # (transformers' progress bar of the shards may come first)
        assert says in err.strip().splitlines()[-1] and "Traceback" not in err, err
        assert not out_dir.exists() and list(out_dir.parent.iterdir()) == []  # nothing left
    monkeypatch.setattr(MemformerForCausalLM, "save_pretrained", real)
    assert main(["export", str(run_dir), str(out_dir)]) == 0  # the rerun is not blocked
    assert (out_dir / "model.safetensors").is_file() and (out_dir / "config.json").is_file()
    assert [p.name for p in out_dir.parent.iterdir()] == ["hf"]
    capsys.readouterr()
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    if not os.access(read_only, os.W_OK):  # (root writes anywhere)
        assert main(["export", str(run_dir), str(read_only / "hf")]) == 2
        err = capsys.readouterr().err
        assert "cannot be written" in err and "Traceback" not in err, err


def test_a_corrupted_or_non_finite_export_is_refused(tmp_path: Path) -> None:
    """An exported folder with a flipped data byte or a NaN weight must not load (it would
    generate zeros). ``save_pretrained`` writes the weight files' sha256 beside
    them and ``from_pretrained`` checks them, and every loaded weight must be finite."""
    from safetensors.torch import load_file, save_file

    out_dir = tmp_path / "hf"
    assert main(["export", str(byte_checkpoint(tmp_path / "run")), str(out_dir)]) == 0
    checksums = out_dir / "memformer_checksums.json"
    AutoModelForCausalLM.from_pretrained(out_dir)  # intact: loads
    weights = out_dir / "model.safetensors"
    intact = weights.read_bytes()
    flipped = bytearray(intact)
    flipped[-6] ^= 0x01  # a low mantissa bit of the last weight: still finite
    weights.write_bytes(bytes(flipped))
    with pytest.raises(RuntimeError, match="does not match its sha256 checksum"):
        AutoModelForCausalLM.from_pretrained(out_dir)
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name][0] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    checksums.unlink(missing_ok=True)  # as saved by an older version, or from a diverged run
    with pytest.raises(RuntimeError, match=r"weight .* is not finite"):
        AutoModelForCausalLM.from_pretrained(out_dir)
    with pytest.raises(RuntimeError, match=r"weight .* is not finite"):
        MemformerForCausalLM.from_pretrained(out_dir, strict=False)


def test_byte_tokenizer_is_the_identity_on_bytes() -> None:
    tokenizer = byte_tokenizer()
    text = "".join(map(chr, range(1, 300)))
    assert tokenizer(text).input_ids == list(text.encode())
    assert tokenizer.decode(list(text.encode())) == text
    assert len(tokenizer) == VOCAB_SIZE


# ---------------------------------------------------------------------------------- training


def training_args(tmp_path: Path, **overrides: object) -> TrainingArguments:
    base = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=3e-3, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
        disable_tqdm=True, max_grad_norm=0.0, seed=0,
    )  # fmt: skip
    return TrainingArguments(**{**base, **overrides})


def test_mrbp_trainer_three_steps(tmp_path: Path) -> None:
    _, hf = wrapped("decoder", n_decoder_layers=1)
    tokens = torch.arange(3000) % 7  # a periodic stream: learnable at once
    data = stream_rollouts(tokens, batch_size=2, rollout_length=3 * L)
    trainer = MRBPTrainer(
        model=hf, args=training_args(tmp_path, max_steps=3), train_dataset=data, carry_memory=True
    )
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert trainer.memory is not None and trainer.memory.shape == (2, 3, 16)
    # evaluation goes through forward with labels: the mean of sequence_loss over the batches
    metrics = trainer.evaluate(data[:4])
    hf.eval()
    batches = [torch.stack([d["input_ids"] for d in data[k : k + 2]]) for k in (0, 2)]
    expected = sum(hf.memformer.sequence_loss(b)[0].item() for b in batches) / 2
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_mrbp_trainer_step_gradients_are_mrbp_backward_averaged(arch: str, tmp_path: Path) -> None:
    model, hf = wrapped(arch, dropout=0.1)
    reference = copy.deepcopy(model).train()
    batches = [ids(2, 3 * L, seed=s) for s in (1, 2)]
    trainer = MRBPTrainer(model=hf, args=training_args(tmp_path), carry_memory=True)
    trainer.current_gradient_accumulation_steps = 2
    returned = []
    for i, batch in enumerate(batches):
        trainer.accelerator.gradient_state._set_sync_gradients(i == 1)
        torch.manual_seed(10 + i)
        returned.append(trainer.training_step(hf, {"input_ids": batch}))
    memory, losses = None, []
    for i, batch in enumerate(batches):
        torch.manual_seed(10 + i)
        result = mrbp.backward(reference, batch, memory)
        memory, losses = result.memory, [*losses, result.loss]
    for (name, p), q in zip(hf.memformer.named_parameters(), reference.parameters()):
        assert q.grad is not None and p.grad is not None
        assert relative_error(p.grad, q.grad / 2) < 1e-6, name
    assert torch.allclose(torch.stack(returned), torch.stack(losses) / 2)
    assert torch.equal(trainer.memory, memory)


@pytest.mark.parametrize("carry_memory", [True, False])
def test_mrbp_trainer_refuses_an_empty_dataset(tmp_path: Path, carry_memory: bool) -> None:
    """An empty dataset is one clear error before anything runs, with ``carry_memory`` (which
    would otherwise "train" to global_step 0 and report success) and without it (where torch
    says "num_samples should be a positive integer value")."""
    _, hf = wrapped("decoder", n_decoder_layers=1)
    trainer = MRBPTrainer(model=hf, args=training_args(tmp_path, max_steps=3), train_dataset=[],
                          carry_memory=carry_memory)  # fmt: skip
    with pytest.raises(ValueError, match=r"train_dataset is empty \(0 rollouts\)"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_mrbp_trainer_refuses_fp16_and_foreign_batches(tmp_path: Path) -> None:
    _, hf = wrapped("decoder")
    trainer = MRBPTrainer(model=hf, args=training_args(tmp_path))
    with pytest.raises(ValueError, match="does not support fp16=True"):
        MRBPTrainer(model=hf, args=training_args(tmp_path, fp16=True))
    with pytest.raises(ValueError, match="token_type_ids"):
        trainer.training_step(hf, {"input_ids": ids(2, L), "token_type_ids": ids(2, L)})
    with pytest.raises(TypeError, match="carry_memory must be a bool"):
        MRBPTrainer(model=hf, args=training_args(tmp_path), carry_memory="yes")  # type: ignore[arg-type]


def test_stream_rollouts_continue_each_stream_batch_after_batch() -> None:
    tokens = torch.arange(100)
    data = stream_rollouts(tokens, batch_size=2, rollout_length=5, num_processes=2)
    # 4 streams of 25 tokens; rollout j, process r, row b = stream r * 2 + b
    assert len(data) == 4 * 5
    batches = [torch.stack([d["input_ids"] for d in data[k : k + 2]]) for k in range(0, 20, 2)]
    for rank in range(2):
        mine = batches[rank::2]  # accelerate gives a process every num_processes-th batch
        for previous, following in itertools.pairwise(mine):
            assert torch.equal(following[:, 0], previous[:, -1] + 1)
    with pytest.raises(ValueError, match="fewer than one rollout"):
        stream_rollouts(torch.arange(10), batch_size=4, rollout_length=5)


def test_mrbp_trainer_bf16_runs_the_rollout_under_autocast(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, hf = wrapped("decoder", n_decoder_layers=1)
    data = stream_rollouts(torch.arange(400) % 7, batch_size=2, rollout_length=2 * L)
    args = training_args(tmp_path, max_steps=1, gradient_accumulation_steps=1, bf16=True)
    trainer = MRBPTrainer(model=hf, args=args, train_dataset=data)
    autocast: list[bool] = []
    read_segment = hf.memformer.read_segment

    def spy(*args: object, **kwargs: object):
        autocast.append(torch.is_autocast_enabled("cpu"))
        return read_segment(*args, **kwargs)

    monkeypatch.setattr(hf.memformer, "read_segment", spy)
    trainer.train()
    assert autocast and all(autocast)
    assert torch.isfinite(torch.tensor(trainer.state.log_history[0]["loss"]))
    assert all(p.dtype == torch.float32 for p in hf.parameters())


def test_export_without_transformers_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import sys

    for name in [n for n in sys.modules if n.startswith("memformer_fast.hf")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers fails
    assert main(["export", str(tmp_path), str(tmp_path / "out")]) == 2
    assert 'pip install "memformer_fast[hf]"' in capsys.readouterr().err
