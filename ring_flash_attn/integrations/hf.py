"""Hugging Face transformers: every attention layer of a model runs on the ring.

Usage (every rank runs the same model on its slice of the sequence)::

    from ring_flash_attn.integrations.hf import register_ring_attention, shard_batch, gather_logits

    name = register_ring_attention(group=cp_group, variant="zigzag")
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=name)   # or model.set_attn_implementation(name)
    local = shard_batch(input_ids, labels, variant="zigzag", group=cp_group)
    logits = model(input_ids=local["input_ids"], position_ids=local["position_ids"]).logits
    full_logits = gather_logits(logits, variant="zigzag", group=cp_group)      # when the full sequence is needed

Through transformers' public ``AttentionInterface`` the model hands us per layer
q/k/v ``[batch, heads, seqlen_local, head_dim]``, its scaling, ``is_causal``,
``sliding_window``, ``softcap`` and the ``position_ids`` it used for rotary
embeddings; we return ``[batch, seqlen_local, heads, head_dim]``. Through
``AttentionMaskInterface`` we replace the dense ``[S, S]`` mask the model would
build with the 2D padding mask (or nothing). The ring mask is built from the
layout's global positions, not from the model's local view.

Honoured: causal and non-causal self-attention, GQA/MQA, sliding windows,
logit soft-capping (kernel backends that support it; the CPU/GPU ``sdpa``
backend does not, the ``reference`` backend does: automatic choice falls back),
right padding (exact on the real tokens under causal attention). Refused with
an error naming the feature: packed sequences (position ids that restart,
``cu_seq_lens_*``) until varlen ring attention exists, left or interior padding,
custom 4D masks and mask overlays, chunked attention, cross-attention, KV caches
(generation), attention dropout, attention sinks and position biases.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
import torch.distributed as dist
import transformers

from ..functional import ring_attention
from ..module import gather_sequence
from ..ring.layouts import get_layout
from ..validation import check_unsupported
from ._versions import require_version

TRANSFORMERS_MINIMUM, TRANSFORMERS_BELOW = "4.56", "6"
require_version("transformers", transformers.__version__, TRANSFORMERS_MINIMUM, TRANSFORMERS_BELOW)

from transformers import AttentionInterface  # noqa: E402  (after the version gate: older versions lack them)
from transformers.masking_utils import AttentionMaskInterface  # noqa: E402

# Not "ring_flash_attn": transformers treats every implementation name containing "flash" as a flash-attn
# kernel (it tries to import one at load time and changes its mask handling).
IMPLEMENTATION_NAME = "ring_attention"
# The name zhuzilin/ring-flash-attention's substitute_hf_flash_attn takes over.
FLASH_ATTENTION_NAME = "flash_attention_2"


@dataclass
class _RingSettings:
    """What one registered implementation name runs with."""

    group: Optional[dist.ProcessGroup]
    variant: str
    backend: Optional[str]
    # The last (position_ids, attention_mask) pair the ranks agreed on; see _agree_on_inputs.
    checked: tuple = field(default=(None, None), repr=False)


_SETTINGS: Dict[str, _RingSettings] = {}


def _varlen_available() -> bool:
    import ring_flash_attn

    return hasattr(ring_flash_attn, "zigzag_ring_flash_attn_varlen_func")


def _packed_error(what: str) -> NotImplementedError:
    return NotImplementedError(
        f"packed sequences ({what}) need varlen ring attention, which this version of ring_flash_attn does not "
        f"have; pass one sequence per batch row, with position_ids from shard_batch")


def _group_rank_and_size(group):
    return dist.get_rank(group), dist.get_world_size(group)


def register_ring_attention(group: Optional[dist.ProcessGroup] = None, variant: str = "zigzag",
                            backend: Optional[str] = None) -> str:
    """Register ring attention with transformers; returns the implementation name (``"ring_attention"``).

    Pass the name as ``attn_implementation=`` to ``from_pretrained``/``from_config`` or to
    ``model.set_attn_implementation``. Idempotent: calling again updates the group, variant and backend used
    by every model already set to this name. ``variant`` is the sequence layout of the inputs (see
    :func:`shard_batch`); ``backend`` forces a kernel backend (default: automatic).
    """
    _register(IMPLEMENTATION_NAME, group, variant, backend)
    return IMPLEMENTATION_NAME


def _register(name: str, group, variant: str, backend: Optional[str]) -> None:
    get_layout(variant)  # ValueError naming the variant, now rather than at the first forward
    _SETTINGS[name] = _RingSettings(group=group, variant=variant, backend=backend)
    AttentionInterface.register(name, _make_attention_forward(name))
    AttentionMaskInterface.register(name, _make_mask(name))


def shard_batch(input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, *, variant: str = "zigzag",
                group: Optional[dist.ProcessGroup] = None, attention_mask: Optional[torch.Tensor] = None) -> dict:
    """This rank's slices of a full batch: ``{"input_ids", "position_ids"[, "labels"][, "attention_mask"]}``.

    Every tensor is ``[batch, seqlen]`` and is cut along dim 1 in ``variant``'s layout (``zigzag`` reorders
    tokens). ``position_ids`` default to ``arange(seqlen)``; passing the result to the model is what keeps
    rotary embeddings right. ``labels`` must already be aligned with ``input_ids`` (shifted by the caller:
    ``labels[:, t]`` is the target of the prediction at token ``t``, ``-100`` where there is none), because
    after sharding a rank no longer holds the next token of its last one; a loss over the local slices then
    needs no shift (transformers' ``model(labels=...)`` shifts again: do not pass them there).
    ``attention_mask`` (1 = token, 0 = padding) may mark right padding only.
    """
    rank, world_size = _group_rank_and_size(group)
    layout = get_layout(variant)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected [batch, seqlen], got shape {tuple(input_ids.shape)}")
    layout.check_global(input_ids.shape[1], world_size)
    if position_ids is None:
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    local = {"input_ids": input_ids, "position_ids": position_ids}
    if labels is not None:
        local["labels"] = labels
    if attention_mask is not None:
        local["attention_mask"] = attention_mask
    for name, tensor in local.items():
        if tensor.shape != input_ids.shape:
            raise ValueError(f"{name}: expected the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(tensor.shape)}")
    return {name: layout.shard(tensor, rank, world_size, dim=1) for name, tensor in local.items()}


def gather_logits(logits_local: torch.Tensor, *, variant: str = "zigzag",
                  group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """The full-sequence ``[batch, seqlen, ...]`` logits on every rank, in token order. Differentiable.

    The backward sums every rank's gradient into each rank's slice: when every rank computes the same loss
    from the gathered logits, average parameter gradients over the group (as DDP does). A loss summed over
    the local slices (divided by the global token count) needs no gather at all.
    """
    return gather_sequence(logits_local, variant, group, dim=1)


# --------------------------------------------------------------------------------------------------------------
# The functions transformers calls.


def _make_mask(name: str):
    def ring_attention_mask(batch_size: int, *, kv_length: int, kv_offset=0, q_length: Optional[int] = None,
                            q_offset=0, cache_position: Optional[torch.Tensor] = None, mask_function=None,
                            attention_mask: Optional[torch.Tensor] = None, config=None, use_vmap: bool = False,
                            **kwargs):
        """Instead of a dense mask: None, or the 2D padding mask when some token is padding.

        transformers < 5 describes the queries by ``cache_position``, later versions by ``q_length`` and
        ``q_offset``."""
        if q_length is None:
            q_length, q_offset = cache_position.shape[0], cache_position[0]
        # Every rank builds its masks once per forward: the point where all ranks forget what they agreed on
        # in the last forward, so that the next layer call checks the new inputs on every rank alike.
        _SETTINGS[name].checked = (None, None)
        if isinstance(q_offset, torch.Tensor):
            q_offset = int(q_offset)
        if q_offset or kv_offset or kv_length != q_length:
            raise NotImplementedError(
                f"KV cache: ring attention runs on whole sequences (training, scoring); got a cached call with "
                f"{kv_length} keys for {q_length} queries at offset {q_offset}. Pass use_cache=False")
        if use_vmap:
            raise NotImplementedError("mask: the model adds its own mask overlay (or_mask_function/"
                                      "and_mask_function, e.g. bidirectional image tokens); ring attention "
                                      "honours only causal, sliding-window and padding masks")
        if config is not None and getattr(config, "attention_chunk_size", None):
            raise NotImplementedError(f"mask: chunked attention (config.attention_chunk_size="
                                      f"{config.attention_chunk_size}) is not supported by ring attention")
        if mask_function is not None and (config is None or getattr(config, "is_causal", True)):
            _check_no_future_keys(mask_function, batch_size, q_length, attention_mask)
        if attention_mask is None or bool(attention_mask.all()):
            return None
        return attention_mask

    ring_attention_mask.__name__ = ring_attention_mask.__qualname__ = f"{name}_mask"
    return ring_attention_mask


def _check_no_future_keys(mask_function, batch_size: int, seqlen: int, attention_mask) -> None:
    """A causal model's mask must hide the next token from every token. Probing the super-diagonal costs O(S)
    and catches overlays that open the future (e.g. bidirectional blocks), which the ring cannot honour."""
    if seqlen < 2:
        return
    q_idx = torch.arange(seqlen - 1)
    device = attention_mask.device if attention_mask is not None else None
    q_idx = q_idx.to(device)
    batch_idx = torch.arange(batch_size, device=device).unsqueeze(1)
    head_idx = torch.zeros((), dtype=torch.long, device=device)
    try:
        sees_next = mask_function(batch_idx, head_idx, q_idx.unsqueeze(0), q_idx.unsqueeze(0) + 1)
    except Exception as exc:  # a mask function that cannot be evaluated on index tensors is not one we know
        raise NotImplementedError(f"mask: the model's mask function {mask_function!r} is not a causal, "
                                  f"sliding-window or padding mask ring attention can honour") from exc
    if bool(torch.as_tensor(sees_next).any()):
        raise NotImplementedError("mask: the model's mask lets some token see a later token in a causal model "
                                  "(e.g. bidirectional blocks); ring attention honours only causal, "
                                  "sliding-window and padding masks")


def _make_attention_forward(name: str):
    def ring_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                               scaling: Optional[float] = None, sliding_window: Optional[int] = None,
                               softcap: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs):
        settings = _SETTINGS[name]
        _refuse_unsupported(module, query, key, attention_mask, dropout, kwargs)
        causal = bool(module.is_causal if is_causal is None else is_causal)
        window = (-1, -1)
        if sliding_window is not None:
            if sliding_window < 1:
                raise ValueError(f"sliding_window: expected >= 1, got {sliding_window}")
            # transformers' window holds `sliding_window` keys including the query's own token
            window = (sliding_window - 1, -1 if causal else sliding_window - 1)
        _agree_on_inputs(settings, kwargs.get("position_ids"), attention_mask, query.shape[0], query.shape[2],
                         causal)
        out, _ = ring_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                variant=settings.variant, causal=causal, softmax_scale=scaling,
                                window_size=window, softcap=softcap or 0.0, group=settings.group,
                                backend=settings.backend)
        return out, None

    ring_attention_forward.__name__ = ring_attention_forward.__qualname__ = f"{name}_forward"
    return ring_attention_forward


def _refuse_unsupported(module, query, key, attention_mask, dropout, kwargs) -> None:
    """Everything here depends on shapes and arguments every rank shares, so every rank raises alike."""
    check_unsupported(dropout, None)
    if key.shape[2] != query.shape[2] or getattr(module, "is_cross_attention", False):
        raise NotImplementedError(f"cross-attention: ring attention is self-attention over one sharded sequence; "
                                  f"got {query.shape[2]} queries and {key.shape[2]} keys in "
                                  f"{type(module).__name__}")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise NotImplementedError(f"attention_mask: a prepared {attention_mask.dim()}D mask cannot be split over "
                                  f"the ring; pass a 2D padding mask (or none) and let the model build the rest")
    for unsupported in ("s_aux", "position_bias"):
        if kwargs.get(unsupported) is not None:
            raise NotImplementedError(f"{unsupported}: not supported by ring attention")
    if any(kwargs.get(k) is not None for k in ("cu_seq_lens_q", "cu_seq_lens_k", "cu_seqlens_q", "cu_seqlens_k")):
        raise _packed_error("cu_seq_lens_q/cu_seq_lens_k from the data collator")


def _agree_on_inputs(settings: _RingSettings, position_ids, padding_mask, batch: int, seqlen_local: int,
                     causal: bool) -> None:
    """Check position ids and padding against the layout, with the same verdict on every rank.

    Each rank sees only its slice, so the ranks first combine what they saw in one small all-reduce, before
    any ring communication. The verdict holds for the (position_ids, mask) pair, which the model passes
    unchanged to every layer, until the mask function runs again at the next forward: one all-reduce per
    forward, on every rank (a rank-local cache could let one rank skip a collective another enters).
    """
    if position_ids is None:
        raise ValueError("position_ids: ring attention needs the position ids the model used (the model did not "
                         "pass them to its attention); pass position_ids from shard_batch")
    checked_positions, checked_mask = settings.checked
    if checked_positions is position_ids and checked_mask is padding_mask:
        return
    rank, world_size = _group_rank_and_size(settings.group)
    layout = get_layout(settings.variant)
    layout.check(seqlen_local, world_size, causal)
    device = position_ids.device
    expected = layout.positions(rank, world_size, seqlen_local, device=device)
    if position_ids.shape[-1] != seqlen_local:
        raise ValueError(f"position_ids: expected {seqlen_local} per row (the local sequence), "
                         f"got shape {tuple(position_ids.shape)}")
    # One int64 vector, reduced with MAX: [positions differ, per row: last real token, -first padding token].
    no_pad = 2 * world_size * seqlen_local
    facts = torch.full((1 + 2 * batch,), -no_pad, dtype=torch.int64, device=device)
    facts[0] = int(not bool((position_ids == expected).all()))
    if padding_mask is not None:
        real = padding_mask.to(device=device, dtype=torch.bool)
        global_pos = expected.expand_as(real)
        facts[1:1 + batch] = torch.where(real, global_pos, -1).amax(dim=1)
        facts[1 + batch:] = -torch.where(real, no_pad, global_pos).amin(dim=1)
    dist.all_reduce(facts, op=dist.ReduceOp.MAX, group=settings.group)
    if bool(facts[0]):
        raise _packed_error(f"position_ids that differ from the positions the {settings.variant!r} layout gives "
                            f"each rank, e.g. restart; or position_ids not from shard_batch")
    last_real, first_pad = facts[1:1 + batch], -facts[1 + batch:]
    if bool((first_pad < no_pad).any()):  # some rank holds padding: decide on the reduced facts, never locally
        if bool((last_real > first_pad).any()):
            raise NotImplementedError("attention_mask: padding before a real token (left or interior padding) is "
                                      "not supported by ring attention; pad on the right")
        if not causal:
            raise NotImplementedError("attention_mask: padding with non-causal attention is not supported by "
                                      "ring attention (real tokens would see the padding)")
    settings.checked = (position_ids, padding_mask)


# --------------------------------------------------------------------------------------------------------------
# Drop-in helpers of zhuzilin/ring-flash-attention (ring_flash_attn.adapters.hf_adapter).


def substitute_hf_flash_attn(process_group: dist.ProcessGroup, heads_k_stride: int) -> None:
    """Make models loaded with ``attn_implementation="flash_attention_2"`` run ring attention on
    ``process_group``, as in zhuzilin/ring-flash-attention.

    Inputs are laid out as there: batch size 1, the (packed) sequence cut into contiguous equal slices in rank
    order (our ``"ring"`` layout), causal; call :func:`update_ring_flash_attn_params` before each batch.
    ``heads_k_stride`` sets how many K/V heads the replaced project's all-gather moved at a time (a memory
    knob); the ring moves whole K/V blocks, so it is checked (>= 1) and otherwise has no effect.
    On machines without flash-attn, transformers refuses ``"flash_attention_2"`` at load time: load the model
    with ``attn_implementation="ring_attention"``, which this call configures the same way.
    """
    if not isinstance(heads_k_stride, int) or heads_k_stride < 1:
        raise ValueError(f"heads_k_stride: expected a positive int, got {heads_k_stride!r}")
    for name in (FLASH_ATTENTION_NAME, IMPLEMENTATION_NAME):
        _register(name, process_group, "ring", None)


def update_ring_flash_attn_params(cu_seqlens: torch.Tensor, process_group: dist.ProcessGroup) -> None:
    """Tell the substituted attention the global ``cu_seqlens`` (int, ``[n_sequences + 1]``, ``cu_seqlens[-1]``
    = total tokens over all ranks) of the packed batch that follows, as in zhuzilin/ring-flash-attention."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens: expected a 1D tensor [0, ..., total_tokens], got {cu_seqlens!r}")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or any(b <= a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens: expected strictly increasing offsets starting at 0, got {bounds}")
    world_size = dist.get_world_size(process_group)
    get_layout("ring").check_global(bounds[-1], world_size)
    if len(bounds) > 2 and not _varlen_available():
        raise _packed_error(f"cu_seqlens with {len(bounds) - 1} sequences")
    for name in (FLASH_ATTENTION_NAME, IMPLEMENTATION_NAME):
        if name not in _SETTINGS:
            raise RuntimeError("update_ring_flash_attn_params: call substitute_hf_flash_attn first")
        # One sequence over the whole ring: the plain causal "ring" layout, whose position ids the attention
        # checks against the model's at the next forward.
        _SETTINGS[name].group = process_group
