"""A decoder-only transformers model, random or pretrained: the full model on one rank, empty shells on the rest.

Nothing is downloaded (a pretrained model is a local directory, see pretrained.py). Every rank builds the model on the ``meta`` device (no
memory), the parallelisation wraps and shards it, each rank allocates only its
shards, and rank 0, the one rank that builds the whole model in host memory,
broadcasts each parameter as the ranks fill their shards.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from . import pretrained, tokens
from .config import ConfigError, RunConfig
from .data import VOCAB_SIZE
from .loss import LOSS_METHOD

# Embedding and LM-head matrices whose row count is a multiple of 64 map onto full matrix-engine tiles.
VOCAB_MULTIPLE = 64
DEFAULT_ROPE_THETA = 10000.0
# What wrappers (activation checkpointing, torch.compile) put in front of a wrapped module's names.
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def padded_vocab_size(tokens: int = VOCAB_SIZE) -> int:
    return -(-tokens // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def _set_rope(hf_config, rope_theta: Optional[float], rope_scaling: Optional[dict]) -> None:
    """Apply the run's rotary settings over the model's own (transformers 5 keeps both in ``rope_parameters``,
    4.x in ``rope_theta`` and ``rope_scaling``)."""
    if hasattr(hf_config, "rope_parameters"):
        params = dict(hf_config.rope_parameters or {})
        params.update(rope_scaling or {})
        if rope_theta is not None:
            params["rope_theta"] = rope_theta
        hf_config.rope_parameters = params
        return
    if rope_scaling is not None:
        hf_config.rope_scaling = dict(rope_scaling)
    if rope_theta is not None:
        hf_config.rope_theta = rope_theta


def _rope_type(hf_config) -> str:
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    return params.get("rope_type", params.get("type", "default"))


def model_config(run_config: RunConfig, saved: Optional[Path] = None):
    """The transformers config of the run's model: the pretrained directory's, or one built from the run config;
    either with the run's rotary settings, ``max_position_embeddings`` covering ``data.seq_len`` and an
    embedding that holds every token id of the data (bytes, or ``data.tokenizer``'s vocabulary). Resuming from
    checkpoint ``saved``: the config the checkpoint keeps, which is that of the model it holds."""
    config, seq_len = run_config.model, run_config.data.seq_len
    data_vocab = tokens.vocab_size(run_config.data) or VOCAB_SIZE
    try:
        from transformers import AutoConfig
    except ImportError:
        raise ConfigError("training needs transformers: pip install 'ring-attention-xpu[hf]'") from None
    if saved is not None:
        try:
            hf_config = AutoConfig.from_pretrained(str(saved), local_files_only=True)
        except (ValueError, KeyError, OSError) as exc:
            raise ConfigError(f"checkpoint {saved}: its model config (config.json) cannot be read: "
                              f"{' '.join(str(exc).split())}") from None
        if data_vocab > hf_config.vocab_size:
            raise ConfigError(f"data: {data_vocab} token ids, more than the {hf_config.vocab_size} rows of the "
                              f"embedding of the model in checkpoint {saved}; resume with the run's own data")
        return hf_config
    if config.pretrained:
        hf_config = pretrained.load_config(Path(config.pretrained))
        positions = hf_config.max_position_embeddings
        extends = config.rope_theta is not None or config.rope_scaling is not None
        if seq_len > positions and not extends and _rope_type(hf_config) == "default":
            raise ConfigError(f"data.seq_len: {seq_len} is beyond the {positions} positions of model.pretrained "
                              f"{config.pretrained!r}; set model.rope_scaling (e.g. {{rope_type: yarn, factor: "
                              f"{-(-seq_len // positions)}, original_max_position_embeddings: {positions}}}) or "
                              f"model.rope_theta to extend its context, or a data.seq_len <= {positions}")
        for key, value in config.extra.items():
            setattr(hf_config, key, value)
        hf_config.use_cache = False
        if data_vocab > hf_config.vocab_size:
            what = f"data.tokenizer {run_config.data.tokenizer!r}" if run_config.data.tokenizer else "byte tokens"
            raise ConfigError(f"{what}: {data_vocab} token ids, more than the {hf_config.vocab_size} rows of the "
                              f"embedding of model.pretrained {config.pretrained!r}; use the model's own tokenizer")
    else:
        fields = dict(vocab_size=padded_vocab_size(data_vocab), hidden_size=config.hidden_size,
                      intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
                      num_attention_heads=config.num_attention_heads,
                      num_key_value_heads=config.num_key_value_heads, use_cache=False)
        fields.update(config.extra)
        try:
            hf_config = AutoConfig.for_model(config.family, **fields)
        except ValueError as exc:
            raise ConfigError(f"config key model.family: transformers does not know {config.family!r}: "
                              f"{exc}") from None
        positions = seq_len
    _set_rope(hf_config, DEFAULT_ROPE_THETA if config.rope_theta is None and not config.pretrained
              else config.rope_theta, config.rope_scaling)
    hf_config.max_position_embeddings = max(seq_len, positions)
    return hf_config


def build_model(run_config: RunConfig, attn_implementation: str) -> nn.Module:
    """The whole model in host memory, float32: the pretrained weights, or fresh ones from ``train.seed``."""
    from transformers import AutoModelForCausalLM

    hf_config = model_config(run_config)
    if run_config.model.pretrained:
        return AutoModelForCausalLM.from_pretrained(run_config.model.pretrained, config=hf_config,
                                                    local_files_only=True, attn_implementation=attn_implementation,
                                                    dtype=torch.float32)
    torch.manual_seed(run_config.train.seed)
    return AutoModelForCausalLM.from_config(hf_config, attn_implementation=attn_implementation)


def build_empty_model(run_config: RunConfig, attn_implementation: str, saved: Optional[Path] = None) -> nn.Module:
    """The same model on the ``meta`` device: structure and shapes, no memory (``saved``: see model_config)."""
    from transformers import AutoModelForCausalLM

    hf_config = model_config(run_config, saved)
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(hf_config, attn_implementation=attn_implementation)
    except (KeyError, TypeError, ValueError) as exc:  # e.g. a rope_scaling that lacks a key its rope_type needs
        raise ConfigError(f"model: transformers cannot build the model from its config (check model.rope_scaling "
                          f"and model.extra): {type(exc).__name__}: {exc}") from None


def check_model(run_config: RunConfig, attn_implementation: str, saved: Optional[Path] = None) -> nn.Module:
    """What can be checked before any communication: the model builds, its embedding holds the data's tokens,
    and a pretrained directory's weights match its config (see pretrained.py); resuming from checkpoint
    ``saved``, the checkpoint's model config builds (its weights are checked when it is loaded). Returns the
    model, empty."""
    empty = build_empty_model(run_config, attn_implementation, saved)
    if run_config.model.pretrained and saved is None:
        pretrained.check_weights(Path(run_config.model.pretrained), empty)
    return empty


def _plain_name(name: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def materialize_from_rank0(model: nn.Module, full_model: Optional[nn.Module], device: torch.device) -> None:
    """Allocate this rank's shards of the (sharded, meta) ``model`` on ``device`` and fill them with rank 0's
    ``full_model`` (None on the other ranks); every rank calls this.

    Parameters and persistent buffers travel through ``set_model_state_dict(broadcast_from_rank0=True)``; the
    buffers a state dict leaves out (rotary frequencies) are broadcast one by one, matched by name.
    """
    model.to_empty(device=device)
    full_state = full_model.state_dict() if full_model is not None else {}
    set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True,
                                                                    broadcast_from_rank0=True))
    source = dict(full_model.named_buffers()) if full_model is not None else {}
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if dist.get_rank() == 0:
                buffer.copy_(source[_plain_name(name)])
            dist.broadcast(buffer, src=0)


@contextlib.contextmanager
def _parameters_on_meta():
    """Modules built inside get their parameters on the ``meta`` device (no memory, no initialisation) and
    their buffers as usual: what a model's computed buffers (rotary frequencies) need and nothing more."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def materialize_for_checkpoint(model: nn.Module, run_config: RunConfig, attn_implementation: str, saved: Path,
                               device: torch.device) -> None:
    """Allocate this rank's shards of the (sharded, meta) ``model`` on ``device`` for checkpoint ``saved`` to
    fill: parameters and persistent buffers are left for the checkpoint; the buffers a state dict leaves out
    (rotary frequencies) are computed here, on every rank, from the checkpoint's model config. Nothing is
    communicated and no weights are read."""
    from transformers import AutoModelForCausalLM

    model.to_empty(device=device)
    with _parameters_on_meta():
        buffers = dict(AutoModelForCausalLM.from_config(model_config(run_config, saved),
                                                        attn_implementation=attn_implementation).named_buffers())
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[_plain_name(name)])


def token_loss_sum(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                   position_ids: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over the given tokens (labels already shifted), in float32, through the
    model's chunked loss (loss.py: no [tokens, vocab] logits).

    The caller divides by the token count of the whole step (every rank, every replica), so the sum, not a
    per-rank mean, is what goes into the loss.
    """
    return getattr(model, LOSS_METHOD)(input_ids, labels, position_ids)
