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
packed sequences (position ids that restart at 0; :func:`shard_batch` lays out
each sequence over the ranks on its own, and attention never crosses a sequence
boundary), right padding (exact on the real tokens under causal attention).
Refused with an error naming the feature: left or interior padding, padding
together with packing, the data collator's ``cu_seq_lens_*``, custom 4D masks
and mask overlays, chunked attention, cross-attention, KV caches and generation
(``model.generate``: generate with ``model.set_attn_implementation("sdpa")``),
attention dropout, attention sinks and position biases.

Importing this module registers the name ``"ring_attention"`` with transformers, so a model may be loaded with
it before :func:`register_ring_attention` (or :func:`substitute_hf_flash_attn`) configures it; its first
forward raises until one of them has run.

zhuzilin/ring-flash-attention's Hugging Face adapter is this module too: its import path
``ring_flash_attn.adapters.hf_adapter`` names this very module object, so what a client reads or replaces there
(``DATA_PARAMS``, ``create_ring_flash_attention_forward``) is what :func:`substitute_hf_flash_attn` uses.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
import torch.distributed as dist
import transformers
import transformers.modeling_flash_attention_utils as flash_utils

from ..comm.collectives import all_gather_sequence
from ..functional import ring_attention
from ..llama3 import llama3_flash_attn_prepare_cu_seqlens, llama3_flash_attn_varlen_func
from ..ring.layouts import PackedLayout, get_layout
from ..ulysses import UspGroups, usp_attention, usp_process_groups
from ..validation import check_unsupported, group_rank_and_size
from ._versions import require_version

TRANSFORMERS_MINIMUM, TRANSFORMERS_BELOW = "4.56", "6"
require_version("transformers", transformers.__version__, TRANSFORMERS_MINIMUM, TRANSFORMERS_BELOW)

from transformers import AttentionInterface  # noqa: E402  (after the version gate: older versions lack them)
from transformers import masking_utils  # noqa: E402
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
    # The (position_ids, attention_mask) pair the ranks last agreed on, and this rank's cu_seqlens for it
    # (None: one sequence per row); see _agree_on_inputs.
    checked: tuple = field(default=(None, None, None), repr=False)
    # ulysses_size > 1: the ulysses x ring mesh over ``group`` (USP); None: the ring alone.
    usp: Optional[UspGroups] = None


_SETTINGS: Dict[str, _RingSettings] = {}

# Said wherever generation shows itself: a cached call, or a forward that fills a KV cache with position ids that
# are not the layout's (model.generate's first step).
GENERATION_UNSUPPORTED = (
    "generation (model.generate, or any forward that fills a KV cache for later calls) is not supported under "
    "ring attention, which runs one whole sequence split over the ranks of a group (training, scoring). Generate "
    "with a regular implementation on the full sequence: model.set_attn_implementation(\"sdpa\") (or \"eager\"), "
    f"and model.set_attn_implementation(\"{IMPLEMENTATION_NAME}\") to return to ring attention")


@dataclass
class _RingUse:
    """Whether ring attention ran since :func:`shard_batch` cut the last batch (see :func:`gather_logits`).

    A model that quietly runs another attention on the sharded inputs (e.g. one of two models built from one
    config object, after the other was reset to eager: they share ``config._attn_implementation``) computes
    each rank's slice against that slice alone: wrong logits, no error. Every rank runs the same model code,
    so every rank counts the same calls and reaches the same verdict without communicating.
    """

    calls: int = 0  # ring attention layer calls in this process
    calls_at_shard: Optional[int] = None  # ``calls`` when the batch was sharded or its logits last gathered


_RING_USE = _RingUse()


def _sequence_lengths(position_ids: torch.Tensor) -> list:
    """Per row, the lengths of the packed sequences: each runs 0, 1, ..., length-1 (a row without restarts is
    one sequence)."""
    starts = position_ids == 0
    steps = position_ids[:, 1:] == position_ids[:, :-1] + 1
    if not bool(starts[:, 0].all()) or not bool((steps | starts[:, 1:]).all()):
        raise ValueError("position_ids: expected each row to be one or more sequences whose positions run "
                         "0, 1, 2, ... (restarting at 0 where a packed sequence starts)")
    lengths = []
    for row in starts:
        bounds = torch.nonzero(row).flatten().tolist() + [row.numel()]
        lengths.append([b - a for a, b in zip(bounds, bounds[1:])])
    return lengths


def _token_order(position_ids: torch.Tensor, layout, world_size: int) -> torch.Tensor:
    """``[batch, world_size, seqlen // world_size]``: which token of the full row each rank holds in each local
    slot, every packed sequence laid out over the ranks on its own."""
    unit = world_size * layout.chunks_per_rank
    rows = []
    for row, lengths in enumerate(_sequence_lengths(position_ids)):
        for n, length in enumerate(lengths):
            if length % unit:
                raise ValueError(f"position_ids: the {layout.name!r} layout splits each sequence into {unit} equal "
                                 f"parts over {world_size} ranks; sequence {n} of row {row} has length {length}")
        packed = PackedLayout(layout, tuple(length // world_size for length in lengths))
        seqlen_local = sum(packed.seqlens_local)
        rows.append(torch.stack([packed.positions(rank, world_size, seqlen_local) for rank in range(world_size)]))
    return torch.stack(rows).to(position_ids.device)


def register_ring_attention(group: Optional[dist.ProcessGroup] = None, variant: str = "zigzag",
                            backend: Optional[str] = None, ulysses_size: int = 1) -> str:
    """Register ring attention with transformers; returns the implementation name (``"ring_attention"``).

    Pass the name as ``attn_implementation=`` to ``from_pretrained``/``from_config`` or to
    ``model.set_attn_implementation``. Idempotent: calling again updates the group, variant and backend used
    by every model already set to this name. ``variant`` is the sequence layout of the inputs (see
    :func:`shard_batch`); ``backend`` forces a kernel backend (default: automatic). ``ulysses_size > 1``
    runs Ulysses / USP on a ``ulysses x ring`` mesh over ``group`` (:mod:`ring_flash_attn.ulysses`; every
    member of ``group`` must call this, the mesh's process groups are created here); batches are sharded
    over ``group`` exactly as for the ring.
    """
    _register(IMPLEMENTATION_NAME, group, variant, backend, ulysses_size)
    return IMPLEMENTATION_NAME


def _register(name: str, group, variant: str, backend: Optional[str], ulysses_size: int = 1) -> None:
    get_layout(variant)  # ValueError naming the variant, now rather than at the first forward
    usp = usp_process_groups(ulysses_size, group) if ulysses_size != 1 else None
    _SETTINGS[name] = _RingSettings(group=group, variant=variant, backend=backend, usp=usp)
    AttentionInterface.register(name, _make_attention_forward(name))
    AttentionMaskInterface.register(name, _make_mask(name))


def is_ring_attention(name: str) -> bool:
    """Whether transformers' attention implementation ``name`` is one this module registered."""
    return name in _SETTINGS


def shard_batch(input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, *, variant: str = "zigzag",
                group: Optional[dist.ProcessGroup] = None, attention_mask: Optional[torch.Tensor] = None) -> dict:
    """This rank's slices of a full batch: ``{"input_ids", "position_ids"[, "labels"][, "attention_mask"]}``.

    Every tensor is ``[batch, seqlen]`` and is cut along dim 1 in ``variant``'s layout (``zigzag`` reorders
    tokens). ``position_ids`` default to ``arange(seqlen)``; passing the result to the model is what keeps
    rotary embeddings right. Packed sequences: position ids that restart at 0 where a sequence starts; each
    sequence is laid out over the ranks on its own, so its length must split like a whole row would.
    ``labels`` must already be aligned with ``input_ids`` (shifted by the caller: ``labels[:, t]`` is the
    target of the prediction at token ``t``, ``-100`` where there is none, e.g. at the end of every packed
    sequence), because after sharding a rank no longer holds the next token of its last one; a loss over the
    local slices then needs no shift (transformers' ``model(labels=...)`` shifts again: do not pass them
    there). ``attention_mask`` (1 = token, 0 = padding) may mark right padding only, without packing.
    """
    rank, world_size = group_rank_and_size(group)
    layout = get_layout(variant)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected [batch, seqlen], got shape {tuple(input_ids.shape)}")
    layout.check_global(input_ids.shape[1], world_size)
    if position_ids is None:
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    full = {"input_ids": input_ids, "position_ids": position_ids}
    if labels is not None:
        full["labels"] = labels
    if attention_mask is not None:
        full["attention_mask"] = attention_mask
    for name, tensor in full.items():
        if tensor.shape != input_ids.shape:
            raise ValueError(f"{name}: expected the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(tensor.shape)}")
    mine = _token_order(position_ids, layout, world_size)[:, rank]
    _RING_USE.calls_at_shard = _RING_USE.calls
    return {name: tensor.gather(1, mine) for name, tensor in full.items()}


def gather_logits(logits_local: torch.Tensor, *, variant: str = "zigzag",
                  group: Optional[dist.ProcessGroup] = None,
                  position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The full-sequence ``[batch, seqlen, ...]`` logits on every rank, in token order. Differentiable.

    For packed sequences pass the full batch's ``position_ids`` (as given to :func:`shard_batch`).
    The backward sums every rank's gradient into each rank's slice: when every rank computes the same loss
    from the gathered logits, average parameter gradients over the group (as DDP does). A loss summed over
    the local slices (divided by the global token count) needs no gather at all.

    Raises ``RuntimeError`` when no ring attention layer ran since :func:`shard_batch` cut the batch (or
    since the last ``gather_logits``): the logits then come from another attention implementation run on
    one rank's slice alone, and are wrong.
    """
    rank, world_size = group_rank_and_size(group)
    if position_ids is None:
        last_forward = _SETTINGS.get(IMPLEMENTATION_NAME)
        if last_forward is not None and last_forward.checked[2] is not None:
            raise ValueError("position_ids: the last forward ran packed sequences; pass the full batch's "
                             "position_ids so that each sequence is put back in order")
        position_ids = torch.arange(world_size * logits_local.shape[1], device=logits_local.device)
        position_ids = position_ids.expand(logits_local.shape[0], -1)
    if _RING_USE.calls_at_shard is not None and _RING_USE.calls == _RING_USE.calls_at_shard:
        raise RuntimeError(
            "gather_logits: no ring attention ran since shard_batch cut this batch (or since the last "
            "gather_logits), so the model computed these logits with another attention implementation on "
            "this rank's slice alone: they are wrong. Check model.config._attn_implementation (two models "
            "built from one config object share it) and set it with "
            "model.set_attn_implementation(register_ring_attention(...)), then run the forward again")
    _RING_USE.calls_at_shard = _RING_USE.calls
    order = _token_order(position_ids, get_layout(variant), world_size).flatten(1)
    gathered = all_gather_sequence(logits_local, group)
    index = order.argsort(dim=1).view(*order.shape, *([1] * (logits_local.dim() - 2)))
    return gathered.gather(1, index.expand(*order.shape, *logits_local.shape[2:]))


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
        _configured(name).checked = (None, None, None)
        if isinstance(q_offset, torch.Tensor):
            q_offset = int(q_offset)
        if q_offset or kv_offset or kv_length != q_length:
            raise NotImplementedError(f"KV cache: got a cached call with {kv_length} keys for {q_length} queries at "
                                      f"offset {q_offset}; {GENERATION_UNSUPPORTED}")
        if use_vmap:
            raise NotImplementedError("mask: the model adds its own mask overlay (or_mask_function/"
                                      "and_mask_function, e.g. bidirectional image tokens); ring attention "
                                      "honours only causal, sliding-window and padding masks")
        if config is not None and getattr(config, "attention_chunk_size", None):
            raise NotImplementedError(f"mask: chunked attention (config.attention_chunk_size="
                                      f"{config.attention_chunk_size}) is not supported by ring attention")
        # An encoder's plain bidirectional mask (BERT, vision towers) is non-causal attention, which the ring serves.
        bidirectional = mask_function is getattr(masking_utils, "bidirectional_mask_function", None)
        if mask_function is not None and not bidirectional and (config is None or getattr(config, "is_causal", True)):
            device = kwargs.get("device") or next(
                (t.device for t in (cache_position, attention_mask) if t is not None), None)
            _check_no_future_keys(mask_function, batch_size, q_length, device)
        if attention_mask is None or bool(attention_mask.all()):
            return None
        return attention_mask

    ring_attention_mask.__name__ = ring_attention_mask.__qualname__ = f"{name}_mask"
    return ring_attention_mask


def _check_no_future_keys(mask_function, batch_size: int, seqlen: int, device) -> None:
    """A causal model's mask must hide the next token from every token. Probing the super-diagonal costs O(S)
    and catches overlays that open the future (e.g. bidirectional blocks), which the ring cannot honour."""
    if seqlen < 2:
        return
    q_idx = torch.arange(seqlen - 1, device=device)
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
        settings = _configured(name)
        _RING_USE.calls += 1
        _refuse_unsupported(module, query, key, attention_mask, dropout, kwargs)
        causal = bool(module.is_causal if is_causal is None else is_causal)
        window = (-1, -1)
        if sliding_window is not None:
            if sliding_window < 1:
                raise ValueError(f"sliding_window: expected >= 1, got {sliding_window}")
            # transformers' window holds `sliding_window` keys including the query's own token
            window = (sliding_window - 1, -1 if causal else sliding_window - 1)
        if torch.is_autocast_enabled(query.device.type):
            # Under autocast, rotary embeddings computed in float32 leave q and k in float32 and v in the autocast
            # dtype; cast all three as autocast casts the inputs of scaled_dot_product_attention.
            dtype = torch.get_autocast_dtype(query.device.type)
            query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
        q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        common = dict(causal=causal, softmax_scale=scaling, window_size=window, softcap=softcap or 0.0,
                      group=settings.group, backend=settings.backend)
        cu_seqlens = _agree_on_inputs(settings, kwargs.get("position_ids"), attention_mask, q.shape[0], q.shape[1],
                                      causal, filling_cache=bool(kwargs.get("use_cache")))
        if cu_seqlens is None:
            out, _ = _context_parallel_attention(settings, q, k, v, common)
            return out, None
        out, _ = _context_parallel_attention(settings, *(t.reshape(-1, *t.shape[2:]) for t in (q, k, v)), common,
                                             cu_seqlens=cu_seqlens)
        return out.view(q.shape), None

    ring_attention_forward.__name__ = ring_attention_forward.__qualname__ = f"{name}_forward"
    return ring_attention_forward


def _configured(name: str) -> _RingSettings:
    settings = _SETTINGS.get(name)
    if settings is None:  # the name is registered at import, so that models can be loaded before configuring it
        raise RuntimeError(f"attn_implementation={name!r}: not configured yet; call register_ring_attention(group=..., "
                           f"variant=...) or substitute_hf_flash_attn(group, heads_k_stride) before the first "
                           f"forward (before from_pretrained/from_config works too)")
    return settings


def _context_parallel_attention(settings: _RingSettings, q, k, v, common: dict, cu_seqlens=None):
    """Ring attention over ``settings.group``, or Ulysses / USP on its mesh when one is set."""
    if settings.usp is None:
        return ring_attention(q, k, v, variant=settings.variant, cu_seqlens=cu_seqlens, **common)
    return usp_attention(q, k, v, **settings.usp.attention_groups(), variant=settings.variant, cu_seqlens=cu_seqlens,
                         **{key: value for key, value in common.items() if key != "group"})


def _refuse_unsupported(module, query, key, attention_mask, dropout, kwargs) -> None:
    """Everything here depends on shapes and arguments every rank shares, so every rank raises alike."""
    check_unsupported(dropout)
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
        raise NotImplementedError("cu_seq_lens_q/cu_seq_lens_k: the data collator's cu_seqlens describe the full "
                                  "batch, not this rank's slice; pack with position_ids through shard_batch")


def _agree_on_inputs(settings: _RingSettings, position_ids, padding_mask, batch: int, seqlen_local: int,
                     causal: bool, filling_cache: bool = False) -> Optional[torch.Tensor]:
    """Check position ids and padding against the layout, with the same verdict on every rank; return this
    rank's ``cu_seqlens`` (int32, over the batch's rows one after the other) when the rows hold packed
    sequences, None when each row is one sequence.

    Each rank sees only its slice, so the ranks first combine what they saw in one small all-reduce, before
    any ring communication. The verdict holds for the (position_ids, mask) pair, which the model passes
    unchanged to every layer, until the mask function runs again at the next forward: the check runs once per
    forward, on every rank (a rank-local cache could let one rank skip a collective another enters).
    """
    if position_ids is None:
        raise ValueError("position_ids: ring attention needs the position ids the model used (the model did not "
                         "pass them to its attention); pass position_ids from shard_batch")
    checked_positions, checked_mask, checked_cu_seqlens = settings.checked
    if checked_positions is position_ids and checked_mask is padding_mask:
        return checked_cu_seqlens
    rank, world_size = group_rank_and_size(settings.group)
    layout = get_layout(settings.variant)
    if position_ids.shape[-1] != seqlen_local:
        raise ValueError(f"position_ids: expected {seqlen_local} per row (the local sequence), "
                         f"got shape {tuple(position_ids.shape)}")
    positions = position_ids.expand(batch, seqlen_local)
    device = positions.device
    expected = layout.positions(rank, world_size, seqlen_local, device=device)
    # One int64 vector, reduced with MAX: [rows are not one sequence each, per row: last real token,
    # -first padding token].
    no_pad = 2 * world_size * seqlen_local
    facts = torch.full((1 + 2 * batch,), -no_pad, dtype=torch.int64, device=device)
    # (a local length the layout cannot hold, e.g. odd under zigzag, gives other positions than the row's)
    facts[0] = int(expected.numel() != seqlen_local or not bool((positions == expected).all()))
    if padding_mask is not None:
        real = padding_mask.to(device=device, dtype=torch.bool)
        global_pos = expected.expand_as(real)
        facts[1:1 + batch] = torch.where(real, global_pos, -1).amax(dim=1)
        facts[1 + batch:] = -torch.where(real, no_pad, global_pos).amin(dim=1)
    dist.all_reduce(facts, op=dist.ReduceOp.MAX, group=settings.group)
    packed = bool(facts[0])
    last_real, first_pad = facts[1:1 + batch], -facts[1 + batch:]
    if bool((first_pad < no_pad).any()):  # some rank holds padding: decide on the reduced facts, never locally
        if packed:
            raise NotImplementedError("attention_mask: padding together with packed sequences is not supported "
                                      "by ring attention; pack without padding")
        if bool((last_real > first_pad).any()):
            raise NotImplementedError("attention_mask: padding before a real token (left or interior padding) is "
                                      "not supported by ring attention; pad on the right")
        if not causal:
            raise NotImplementedError("attention_mask: padding with non-causal attention is not supported by "
                                      "ring attention (real tokens would see the padding)")
    cu_seqlens = _packed_cu_seqlens(settings.group, positions, layout, rank, world_size, filling_cache) \
        if packed else None
    if cu_seqlens is None:
        layout.check(seqlen_local, world_size, causal)
    settings.checked = (position_ids, padding_mask, cu_seqlens)
    return cu_seqlens


def _packed_cu_seqlens(group, positions: torch.Tensor, layout, rank: int, world_size: int,
                       filling_cache: bool = False) -> torch.Tensor:
    """This rank's cu_seqlens for packed rows laid out by :func:`shard_batch`.

    Every rank holds the same share of each sequence, and the first rank's share of a sequence starts at
    position 0, so the first rank's restarts are every rank's sequence boundaries: it broadcasts its position
    ids; each rank then checks its own against the layout, and the ranks agree in one all-reduce."""
    first = positions.contiguous().clone()
    dist.broadcast(first, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    if not bool((first[:, 0] == 0).all()):
        raise ValueError("position_ids: every row must start a sequence at position 0; pass position_ids from "
                         "shard_batch")
    lengths = []
    for row in first:
        bounds = torch.nonzero(row == 0).flatten().tolist() + [row.numel()]
        lengths.extend(b - a for a, b in zip(bounds, bounds[1:]))
    expected = torch.cat([layout.positions(rank, world_size, length, device=positions.device) for length in lengths])
    mismatch = torch.tensor([int(expected.numel() != positions.numel()
                                 or not bool((positions.flatten() == expected).all()))], device=positions.device)
    dist.all_reduce(mismatch, op=dist.ReduceOp.MAX, group=group)
    if bool(mismatch):
        differ = (f"position_ids: they differ from the positions the {layout.name!r} layout gives each rank, for "
                  f"one sequence per row or for packed sequences (restarting at 0)")
        if filling_cache:  # use_cache: every rank alike
            raise NotImplementedError(f"{differ}, and the forward fills a KV cache: {GENERATION_UNSUPPORTED}. For "
                                      "training or scoring pass position_ids from shard_batch and use_cache=False")
        raise ValueError(f"{differ}; pass position_ids from shard_batch with the same variant (model.generate() "
                         "ends here too: generation is not supported under ring attention, use "
                         "model.set_attn_implementation(\"sdpa\") for it)")
    return torch.tensor([0] + lengths, device=positions.device).cumsum(0).to(torch.int32)


# --------------------------------------------------------------------------------------------------------------
# zhuzilin/ring-flash-attention's Hugging Face adapter (imported there as ring_flash_attn.adapters.hf_adapter,
# which is this module): its names, filled and looked up as there, over llama3_flash_attn_varlen_func.

# The packed batch of the next forward, for this rank (causal layers), as update_ring_flash_attn_params fills it.
DATA_PARAMS: dict = {}
_DATA_PARAM_NAMES = ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "local_k_slice")
# False: the substituted transformers function runs transformers' own flash attention instead (use_ring_attn).
RING_ATTN_SWITCH = True


@dataclass
class _PackedBatch:
    """What update_ring_flash_attn_params was last given; non-causal layers derive their own pieces from it."""

    cu_seqlens: torch.Tensor
    group: Optional[dist.ProcessGroup]
    causal_cu_seqlens_q: torch.Tensor  # the DATA_PARAMS entry filled alongside (a hand-filled one differs)
    non_causal: Optional[tuple] = None


_PACKED: Optional[_PackedBatch] = None


def check_params(f1, f2) -> bool:
    """Whether ``f1`` and ``f2`` take the same number of parameters: how :func:`substitute_hf_flash_attn` picks,
    among the functions :func:`create_ring_flash_attention_forward` returns, the one that takes the installed
    transformers' ``_flash_attention_forward`` arguments."""
    return len(inspect.signature(f1).parameters) == len(inspect.signature(f2).parameters)


def use_ring_attn(flag: bool) -> None:
    """Switch the substituted flash attention between ring attention (True, the default) and transformers' own."""
    global RING_ATTN_SWITCH
    RING_ATTN_SWITCH = bool(flag)


def update_ring_flash_attn_params(cu_seqlens: torch.Tensor, process_group: dist.ProcessGroup) -> None:
    """Describe the packed batch of the next forward: ``cu_seqlens`` (int32 ``[n_sequences + 1]``) over the
    whole row, all ranks' pieces together; rank r holds the r-th of ``world_size`` equal contiguous pieces.

    Fills :data:`DATA_PARAMS` with this rank's causal ``cu_seqlens_q``, ``cu_seqlens_k``, ``max_seqlen_q``,
    ``max_seqlen_k`` and ``local_k_slice`` (:func:`~ring_flash_attn.llama3_flash_attn_prepare_cu_seqlens`), as
    zhuzilin/ring-flash-attention does; non-causal layers derive theirs from the same call."""
    global _PACKED
    rank, world_size = group_rank_and_size(process_group)
    params = llama3_flash_attn_prepare_cu_seqlens(cu_seqlens, True, rank, world_size)
    DATA_PARAMS.update(zip(_DATA_PARAM_NAMES, params))
    _PACKED = _PackedBatch(cu_seqlens, process_group, params[0])


def _packed_pieces(causal: bool) -> tuple:
    if not all(name in DATA_PARAMS for name in _DATA_PARAM_NAMES):
        raise RuntimeError("update_ring_flash_attn_params: call it with the batch's cu_seqlens before the forward "
                           "(substitute_hf_flash_attn mode)")
    if causal:
        return tuple(DATA_PARAMS[name] for name in _DATA_PARAM_NAMES)
    if _PACKED is None or _PACKED.causal_cu_seqlens_q is not DATA_PARAMS["cu_seqlens_q"]:
        raise RuntimeError("causal=False: a non-causal layer needs the whole row's cu_seqlens; describe the batch "
                           "with update_ring_flash_attn_params instead of filling DATA_PARAMS by hand")
    if _PACKED.non_causal is None:
        rank, world_size = group_rank_and_size(_PACKED.group)
        _PACKED.non_causal = llama3_flash_attn_prepare_cu_seqlens(_PACKED.cu_seqlens, False, rank, world_size)
    return _PACKED.non_causal


def create_ring_flash_attention_forward(process_group: dist.ProcessGroup, heads_k_stride: int) -> list:
    """Functions that stand in for transformers' ``_flash_attention_forward``; :func:`substitute_hf_flash_attn`
    installs the first one that :func:`check_params` matches with the installed transformers' (here: the one
    function, which takes every transformers version's arguments and declares the installed one's signature).

    It runs :func:`~ring_flash_attn.llama3_flash_attn_varlen_func` over ``process_group`` on the packed row that
    :func:`update_ring_flash_attn_params` described, ``heads_k_stride`` K/V heads per all-gather: queries
    ``[1, tokens_local, heads, head_dim]``, causal or not (encoders), sliding windows and soft-capping honoured.
    The model's ``position_ids`` and ``cu_seq_lens_*`` are not read: the packed batch is the one described.
    """
    if isinstance(heads_k_stride, bool) or not isinstance(heads_k_stride, int) or heads_k_stride < 1:
        raise ValueError(f"heads_k_stride: expected a positive int, got {heads_k_stride!r}")

    def ring_flash_attention_forward(query_states, key_states, value_states, attention_mask, query_length: int,
                                     is_causal: bool, dropout: float = 0.0, position_ids=None, softmax_scale=None,
                                     sliding_window=None, use_top_left_mask: bool = False, softcap=None,
                                     deterministic=None, **kwargs):
        # flash-attn < 2.1 aligned a causal mask top-left: a single query then sees every key.
        causal = bool(is_causal) and not (use_top_left_mask and query_length == 1)
        if query_states.shape[0] != 1:
            raise ValueError(f"batch: substitute_hf_flash_attn expects one packed row (batch size 1), got "
                             f"{query_states.shape[0]}; pack the batch and describe it with "
                             f"update_ring_flash_attn_params")
        if key_states.shape[1] != query_states.shape[1]:
            raise NotImplementedError(f"cross-attention: ring attention is self-attention over one sharded "
                                      f"sequence; got {query_states.shape[1]} queries and {key_states.shape[1]} keys")
        if attention_mask is not None:
            raise NotImplementedError("attention_mask: padding is not supported in substitute_hf_flash_attn mode; "
                                      "describe the packed sequences with update_ring_flash_attn_params")
        if kwargs.get("s_aux") is not None:
            raise NotImplementedError("s_aux: attention sinks are not supported by ring attention")
        window = (-1, -1)
        if sliding_window is not None:  # transformers' window holds `sliding_window` keys, the query's own included
            window = (sliding_window - 1, -1 if causal else sliding_window - 1)
        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, local_k_slice = _packed_pieces(causal)
        out = llama3_flash_attn_varlen_func(
            query_states[0], key_states[0], value_states[0], cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
            heads_k_stride, local_k_slice, dropout_p=dropout, softmax_scale=softmax_scale, causal=causal,
            window_size=window, deterministic=bool(deterministic), group=process_group, softcap=softcap or 0.0)
        return out.unsqueeze(0)

    ring_flash_attention_forward.__signature__ = inspect.signature(_transformers_flash_attention_forward())
    return [ring_flash_attention_forward]


def _transformers_flash_attention_forward():
    """transformers' ``_flash_attention_forward`` as installed, seen through our substitution if one is in place."""
    current = flash_utils._flash_attention_forward
    return getattr(current, "_replaced", current)


def flash_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                            scaling: Optional[float] = None, sliding_window: Optional[int] = None,
                            softcap: Optional[float] = None, **kwargs):
    """The attention function :func:`substitute_hf_flash_attn` registers for ``"flash_attention_2"`` (and
    ``"ring_attention"``): q/k/v ``[batch, heads, seqlen, head_dim]`` are handed, transposed, to
    ``transformers.modeling_flash_attention_utils._flash_attention_forward`` as it is at call time (the
    substituted one, or whatever a client installed there); returns ``([batch, seqlen, heads, head_dim], None)``."""
    is_causal = kwargs.pop("is_causal", None)
    causal = module.is_causal if is_causal is None else is_causal
    seqlen = query.shape[2]
    query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    dtype = query.dtype
    if torch.is_autocast_enabled(query.device.type):
        # Rotary embeddings computed in float32 leave q and k in float32 and v in the autocast dtype.
        autocast_dtype = torch.get_autocast_dtype(query.device.type)
        query, key, value = query.to(autocast_dtype), key.to(autocast_dtype), value.to(autocast_dtype)
    out = flash_utils._flash_attention_forward(query, key, value, attention_mask, query_length=seqlen,
                                               is_causal=causal, dropout=dropout, softmax_scale=scaling,
                                               sliding_window=sliding_window, softcap=softcap,
                                               use_top_left_mask=False, **kwargs)
    return out.to(dtype), None


def _switched(ring_forward, transformers_forward):
    """What replaces transformers' ``_flash_attention_forward``: ``ring_forward`` while :data:`RING_ATTN_SWITCH`
    is on, transformers' own otherwise. It declares transformers' signature, so that :func:`check_params` still
    matches it against the installed transformers after the substitution."""

    def _flash_attention_forward(*args, **kwargs):
        return (ring_forward if RING_ATTN_SWITCH else transformers_forward)(*args, **kwargs)

    _flash_attention_forward.__signature__ = inspect.signature(transformers_forward)
    _flash_attention_forward._replaced = transformers_forward
    return _flash_attention_forward


def substitute_hf_flash_attn(process_group: dist.ProcessGroup, heads_k_stride: int) -> None:
    """Make models with ``attn_implementation="flash_attention_2"`` run context-parallel attention on
    ``process_group``, as in zhuzilin/ring-flash-attention.

    Inputs are laid out as there: batch size 1, the packed sequences cut into contiguous equal pieces in rank
    order (sequences may cross pieces); call :func:`update_ring_flash_attn_params` with the batch's
    ``cu_seqlens`` before each forward. K/V are exchanged by all-gather ("llama3"), ``heads_k_stride`` K/V
    heads at a time. Causal and non-causal layers (encoders) are served.

    As there, transformers' ``_flash_attention_forward`` is replaced by the function of
    ``create_ring_flash_attention_forward(process_group, heads_k_stride)`` (this module's, looked up now: a
    client may have replaced it) whose parameters match it (:func:`check_params`), and :func:`flash_attention_forward`
    is registered for ``"flash_attention_2"``. On machines without flash-attn (CPUs), transformers refuses
    ``"flash_attention_2"`` when loading a model: load it with ``attn_implementation="ring_attention"``, which
    this call configures the same way (until :func:`register_ring_attention` is called again).
    """
    transformers_forward = _transformers_flash_attention_forward()
    candidates = create_ring_flash_attention_forward(process_group, heads_k_stride)
    chosen = next((f for f in candidates if check_params(transformers_forward, f)), None)
    if chosen is None:
        raise ValueError(
            f"create_ring_flash_attention_forward: none of the functions it returned takes the "
            f"{len(inspect.signature(transformers_forward).parameters)} parameters of transformers "
            f"{transformers.__version__}'s _flash_attention_forward (they take "
            f"{[len(inspect.signature(f).parameters) for f in candidates]})")
    flash_utils._flash_attention_forward = _switched(chosen, transformers_forward)
    AttentionInterface.register(FLASH_ATTENTION_NAME, flash_attention_forward)
    _register(IMPLEMENTATION_NAME, process_group, "ring", None)  # its mask (padding, KV cache refused)
    AttentionInterface.register(IMPLEMENTATION_NAME, flash_attention_forward)


# Known to transformers from import on: models can be loaded with the name before it is configured.
AttentionInterface.register(IMPLEMENTATION_NAME, _make_attention_forward(IMPLEMENTATION_NAME))
AttentionMaskInterface.register(IMPLEMENTATION_NAME, _make_mask(IMPLEMENTATION_NAME))
