"""``MemformerForCausalLM``: the package's :class:`~memformer_fast.Memformer` as a ``transformers``
``PreTrainedModel`` with ``generate()``, ``save_pretrained`` / ``from_pretrained`` and the Auto
classes.

The model is not re-implemented: ``MemformerForCausalLM.memformer`` is a ``Memformer`` and every
computation is its own. Both architectures are causal LMs over one token stream: ``forward``
reads any number of tokens, segment by segment, and returns next-token logits for every position,
the loss when ``labels`` are given, and a :class:`MemformerCache` (the memory and the key/value
caches of the segment being written) to continue from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..layers import MemoryWriter, RotarySelfAttention, init_weights, rotary_frequencies
from ..model import IGNORE_INDEX, Memformer
from ..validation import check_ids, check_labels, check_mask
from .cache import MemformerCache, advance
from .configuration import MemformerHFConfig

# What MemformerForCausalLM.save_pretrained writes next to the weights: their files' sha256.
CHECKSUM_FILE = "memformer_checksums.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_checksums(folder: Path) -> None:
    """Write :data:`CHECKSUM_FILE` into ``folder``: the sha256 of each weight file in it."""
    files = sorted(
        p.name for p in folder.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES)
    )
    entry = {"algorithm": "sha256", "files": {name: _file_sha256(folder / name) for name in files}}
    (folder / CHECKSUM_FILE).write_text(json.dumps(entry, indent=2) + "\n")


def verify_checksums(folder: Path) -> None:
    """Compare ``folder``'s weight files with its :data:`CHECKSUM_FILE` (nothing to do without
    one); a ``RuntimeError`` names the first file that does not match."""
    path = folder / CHECKSUM_FILE
    if not path.is_file():
        return
    try:
        stored = json.loads(path.read_text())
        files = stored["files"]
        assert stored["algorithm"] == "sha256" and isinstance(files, dict)
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in files.items())
    except (ValueError, KeyError, TypeError, AssertionError):
        problem = f"{path} is malformed: restore a copy, or save the model again"
        raise RuntimeError(problem) from None
    for name, expected in sorted(files.items()):
        weights = folder / name
        if Path(name).name != name or not weights.is_file():
            raise RuntimeError(f"{folder}: {name}, listed in {CHECKSUM_FILE}, is missing")
        if _file_sha256(weights) != expected:
            raise RuntimeError(
                f"{weights} does not match its sha256 checksum in {CHECKSUM_FILE} (the file "
                "changed after it was saved): restore a copy, or export the model again"
            )


def _check_finite(loaded: Any, where: object) -> Any:
    """``loaded`` (a model, or ``(model, info)``) after checking that every weight is finite."""
    model = loaded[0] if isinstance(loaded, tuple) else loaded
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise RuntimeError(
                f"{where}: weight {name} is not finite (NaN or infinity): the checkpoint is "
                "corrupted or was saved from a diverged run"
            )
    return loaded


# The output's cache field: ``cache`` from transformers 5.2x, ``past_key_values`` before.
_OUTPUT_FIELDS = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
CACHE_FIELD = "cache" if "cache" in _OUTPUT_FIELDS else "past_key_values"
# ``forward`` keywords transformers may pass that change nothing here.
_IGNORED_KWARGS = frozenset(
    {"position_ids", "cache_position", "output_attentions", "output_hidden_states",
     "num_items_in_batch", "token_type_ids"}
)  # fmt: skip


class MemformerPreTrainedModel(PreTrainedModel):
    """Base class: config class, weight initialisation of missing weights, tied embeddings."""

    config_class = MemformerHFConfig
    base_model_prefix = "memformer"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _no_split_modules = ["MemoryBlock", "DecoderBlock", "MemoryWriter"]  # noqa: RUF012
    accepts_loss_kwargs = False  # the loss is a mean over the rollout's predicted tokens

    def _init_weights(self, module: nn.Module) -> None:
        """Initialise ``module``'s own weights as ``Memformer.__init__`` does.

        transformers calls this for every module of a new model (children first), and in
        ``from_pretrained`` for the weights the checkpoint did not provide and the rotary
        frequencies (not saved); its guarded init functions skip every loaded tensor, and the
        memory bias is rescaled only where it was drawn here.
        """
        from transformers import initialization as init

        c = self.config
        if isinstance(module, RotarySelfAttention):
            # Non-persistent buffers: rebuilt here, as a model made on the meta device has none.
            head_dim = module.qkv.in_features // module.n_heads
            init.copy_(module.inv_freq, rotary_frequencies(head_dim, c.rope_base))
        elif isinstance(module, MemoryWriter):
            if module.inv_freq is not None:
                head_dim = module.q.in_features // module.n_heads
                init.copy_(module.inv_freq, rotary_frequencies(head_dim, c.rope_base))
            bias = module.bias
            if not getattr(bias, "_is_hf_initialized", False):
                with torch.no_grad():
                    bias.normal_()
                    bias.mul_(c.bias_init_norm / bias.norm(dim=-1, keepdim=True))
            if module.gate is not None:  # after the gate's own (zero) init: children come first
                init.constant_(module.gate.bias, c.gate_bias_init)
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            init_weights(module, c.init_std, c.embedding_init_std)
        elif isinstance(module, nn.LayerNorm):
            module.reset_parameters()


class MemformerForCausalLM(MemformerPreTrainedModel, GenerationMixin):
    """A :class:`~memformer_fast.Memformer` (either architecture) as a ``transformers`` causal LM.

    ``forward(input_ids [B, N], attention_mask=None, labels=None, past_key_values=None,
    memory=None, use_cache=None, logits_to_keep=0)`` reads ``N`` tokens (any number: segments are
    cut from the start of the stream, or continue the cache's current segment) and returns a
    ``CausalLMOutputWithPast``: ``logits [B, N, V]`` (position ``i`` scores token ``i + 1``;
    NaN where the model makes no prediction: the first segment of the encoder-decoder but its
    last token), ``loss`` (with ``labels``: the mean cross-entropy over every predicted,
    non-ignored token, as ``Memformer.sequence_loss`` defines it) and the
    :class:`MemformerCache` to continue from (unless ``use_cache=False``).

    ``generate()`` streams through that cache: greedy, sampling, beam search (the memory and
    caches reorder with the beams), streamers; the tokens are those of ``Memformer.generate``.
    Prompts of a batch must have the same length (no padding): each row's segments are cut from
    its own start.
    """

    _tied_weights_keys: ClassVar[dict[str, str]] = {  # type: ignore[misc]
        "memformer.lm_head.weight": "memformer.embed.weight"
    }

    def __init__(self, config: MemformerHFConfig) -> None:
        if not isinstance(config, MemformerHFConfig):
            raise TypeError(f"config must be a MemformerHFConfig, got {type(config).__name__}")
        super().__init__(config)
        self.memformer = Memformer(config.to_memformer_config())
        self.post_init()

    @classmethod
    def from_memformer(cls, model: Memformer) -> MemformerForCausalLM:
        """Wrap a copy of ``model``'s weights (its config becomes a :class:`MemformerHFConfig`)."""
        if not isinstance(model, Memformer):
            raise TypeError(f"model must be a Memformer, got {type(model).__name__}")
        wrapped = cls(MemformerHFConfig.from_memformer_config(model.config))
        wrapped.memformer.load_state_dict(model.state_dict())
        nn.Module.to(wrapped, model.device)
        return wrapped

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        """``PreTrainedModel.save_pretrained``, plus :data:`CHECKSUM_FILE`: the sha256 of every
        weight file written, which :meth:`from_pretrained` verifies (a flipped byte in a folder
        loaded silently before)."""
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", args[0] if args else True):
            write_checksums(Path(save_directory))
        return result

    @classmethod
    def from_pretrained(cls, *args: Any, strict: bool = True, **kwargs: Any) -> Any:
        """``PreTrainedModel.from_pretrained``, strict by default, as ``Memformer.load_state_dict``.

        With ``strict=True`` a checkpoint whose weights do not fit the config (missing,
        unexpected, or of another shape) raises a ``RuntimeError`` listing every one, where
        transformers would warn and initialise them at random. ``strict=False`` (or
        ``ignore_mismatched_sizes=True``) is transformers' behaviour.

        Either way, a local folder's weight files are first checked against the checksums
        :meth:`save_pretrained` wrote next to them (a folder without them, saved by an older
        version, is not), and every loaded weight must be finite: a ``RuntimeError`` names the
        file or the tensor otherwise.
        """
        where = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        if isinstance(where, (str, os.PathLike)) and Path(where).is_dir():
            verify_checksums(Path(where))
        if not strict or kwargs.get("ignore_mismatched_sizes"):
            return _check_finite(super().from_pretrained(*args, **kwargs), where)
        with_info = kwargs.pop("output_loading_info", False)
        kwargs.update(ignore_mismatched_sizes=True, output_loading_info=True)
        loaded: Any = super().from_pretrained(*args, **kwargs)
        model, info = loaded
        problems = [
            f"{key}: expected shape {list(expected)}, got {list(saved)}"
            for key, saved, expected in sorted(info["mismatched_keys"])
        ]
        for kind in ("missing_keys", "unexpected_keys"):
            if info[kind]:
                problems.append(f"{kind.replace('_', ' ')}: {sorted(info[kind])}")
        if problems:
            raise RuntimeError(
                "the checkpoint does not fit this MemformerForCausalLM (was it saved with another "
                "config?); pass strict=False to load it anyway:\n  " + "\n  ".join(problems)
            )
        _check_finite(model, where)
        return (model, info) if with_info else model

    # --------------------------------------------------------------- embeddings (transformers API)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.memformer.embed

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.memformer.embed = cast(nn.Embedding, value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.memformer.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.memformer.lm_head = cast(nn.Linear, value)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # forward creates its own MemformerCache

    # ------------------------------------------------------------------------------- forward

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        past_key_values: MemformerCache | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        memory: Tensor | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        inputs_embeds: Tensor | None = None,
        cache: MemformerCache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        """See the class docstring. ``cache`` is ``past_key_values``' newer name."""
        m = self.memformer
        unknown = sorted(set(kwargs) - _IGNORED_KWARGS)
        if unknown:
            raise TypeError(f"MemformerForCausalLM.forward got unexpected arguments {unknown}")
        for name in ("output_attentions", "output_hidden_states"):
            if kwargs.get(name):
                raise ValueError(f"{name}=True is not supported: the fused kernels return neither")
        if inputs_embeds is not None:
            raise ValueError("MemformerForCausalLM reads input_ids; inputs_embeds is not supported")
        if input_ids is None:
            raise ValueError("input_ids is required: token ids [B, N]")
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise ValueError("pass the cache as past_key_values or as cache, not both")
        state = cache if cache is not None else past_key_values
        if state is not None and not isinstance(state, MemformerCache):
            if state.get_seq_length() > 0:
                raise TypeError(
                    "past_key_values must be a MemformerCache (from a previous call), got a "
                    f"non-empty {type(state).__name__}"
                )
            state = None  # an empty cache of another kind: replaced by ours
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int):
            raise TypeError(f"logits_to_keep must be an int >= 0, got {logits_to_keep!r}")
        if logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an int >= 0, got {logits_to_keep}")
        input_ids = check_ids(m, "input_ids", input_ids)
        seen = 0 if state is None else state.get_seq_length()
        n = input_ids.shape[1]
        # transformers' convention: the mask may cover the cached tokens and the new ones.
        if isinstance(attention_mask, Tensor) and seen > 0 and attention_mask.shape[-1] == seen + n:
            if not bool(attention_mask[..., :seen].bool().all()):
                raise ValueError("attention_mask: padding in cached tokens is not supported")
            attention_mask = attention_mask[..., seen:]
        mask = check_mask("attention_mask", attention_mask, input_ids)
        if labels is not None:
            labels = check_labels(m, labels, input_ids)
        returned = state is not None or use_cache is not False
        state = MemformerCache() if state is None else state
        if memory is not None and state.memory is not None:
            memory = None  # generate() passes it on every step: it is M_0 of an empty cache only
        # The encoder-decoder predicts nothing inside a stream's first segment but its last token.
        unpredicted = 0
        if m.is_encoder_decoder and state.context is None:
            unpredicted = min(m.config.segment_length - state.length, n) - 1
        keep = 0 if labels is not None else logits_to_keep
        logits = advance(m, state, input_ids, mask, memory, keep)
        loss = None if labels is None else self._loss(logits, labels, mask, unpredicted)
        fields: dict[str, Any] = {CACHE_FIELD: state if returned else None}
        out = CausalLMOutputWithPast(loss=loss, logits=logits, **fields)
        if return_dict is False:
            return out.to_tuple()
        return out

    @staticmethod
    def _loss(logits: Tensor, labels: Tensor, mask: Tensor | None, unpredicted: int) -> Tensor:
        """Mean cross-entropy of ``logits[:, i]`` against ``labels[:, i + 1]`` over the predicted
        (from position ``unpredicted`` on), real (``mask``) and non-ignored positions:
        ``sequence_loss``'s definition. A non-finite logit makes a non-finite loss."""
        targets = labels[:, unpredicted + 1 :]
        if mask is not None:
            targets = targets.masked_fill(~mask[:, unpredicted + 1 :], IGNORE_INDEX)
        scores = logits[:, unpredicted:-1]
        count = int((targets != IGNORE_INDEX).sum())
        if count == 0:
            raise ValueError(
                "labels leave no token to predict: every label is ignored or padded, or falls "
                "where the model makes no prediction (the encoder-decoder predicts from the "
                "second segment on)"
            )
        upcast = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores
        total = F.cross_entropy(
            upcast.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return total / count

    # ---------------------------------------------------------------------------- generation

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``GenerationMixin.generate`` through a :class:`MemformerCache`.

        Raises ``ValueError`` for a padded batch (``attention_mask`` with zeros): each row's
        segments are cut from its own first token, so rows of different lengths cannot share a
        segment grid. Generate such prompts one at a time, or in groups of equal length.
        """
        mask = kwargs.get("attention_mask")
        if isinstance(mask, Tensor) and not bool(mask.bool().all()):
            raise ValueError(
                "MemformerForCausalLM.generate: padded prompts (attention_mask with zeros) are "
                "not supported: each row's segments start at its own first token, so rows of "
                "different lengths cannot be batched. Batch prompts of equal length, unpadded"
            )
        if kwargs.get("assistant_model") is not None:
            raise ValueError(
                "assisted generation is not supported: the memory cannot be rolled back"
            )
        return super().generate(*args, **kwargs)
