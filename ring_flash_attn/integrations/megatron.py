"""Megatron-Core: a core-attention module that runs on the context-parallel group as a ring.

Megatron splits a sequence for context parallelism (``get_batch_on_this_cp_rank``) into ``2·cp`` chunks,
rank ``r`` holding chunks ``r`` and ``2·cp-1-r``: our ``"zigzag"`` layout. Its rotary embeddings and loss
already follow that split, so swapping the core attention is all it takes::

    from ring_flash_attn.integrations.megatron import ring_gpt_layer_spec

    spec = ring_gpt_layer_spec()                      # Megatron's local GPT layer spec, ring core attention
    model = GPTModel(config=config, transformer_layer_spec=spec, ...)

or, in an existing spec, ``spec.submodules.self_attention.submodules.core_attention = RingCoreAttention``.

Ulysses and USP (:mod:`ring_flash_attn.ulysses`) run on the same split: Megatron's own ``cp_comm_type``
``"a2a"`` (Ulysses over the whole CP group) or ``"a2a+p2p"`` (USP with
``config.hierarchical_context_parallel_sizes = [ulysses, ring]``, Ulysses inner), or the extra
``ulysses_size`` (``ring_gpt_layer_spec(ulysses_size=2)``). The zigzag split over all CP ranks is the layout
USP expects, so nothing else changes.

The module takes ``DotProductAttention``'s constructor and forward arguments; tensors are
``[seqlen_local, batch, heads, head_dim]`` in, ``[seqlen_local, batch, heads * head_dim]`` out. Honoured:
causal and unmasked self-attention, GQA, sliding windows (``config.window_size``, with
``window_attn_skip_freq``), ``softmax_scale`` and query-key layer scaling. Refused with an error naming the
feature: packed sequences (``packed_seq_params``), masks other than causal / none, attention bias, attention
dropout, non-vanilla softmax, cross-attention, tensor parallelism with a head count it does not divide, a
``ring_group`` that is not Megatron's context-parallel group, ``cp_comm_type="all_gather"``, and a Ulysses
degree that does not divide the CP size or the heads of a tensor-parallel rank.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

import megatron.core

from ..functional import ring_attention
from ..ulysses import usp_attention, usp_process_groups
from ._versions import require_version

MEGATRON_CORE_MINIMUM, MEGATRON_CORE_BELOW = "0.15", "0.17"
require_version("megatron-core", megatron.core.__version__, MEGATRON_CORE_MINIMUM, MEGATRON_CORE_BELOW)

from megatron.core import parallel_state  # noqa: E402  (after the version gate)
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402
from megatron.core.transformer.module import MegatronModule  # noqa: E402
from megatron.core.transformer.spec_utils import ModuleSpec  # noqa: E402
from megatron.core.transformer.utils import is_layer_window_attention  # noqa: E402


def _group_ranks(group) -> list:
    return list(dist.get_process_group_ranks(group))


class RingCoreAttention(MegatronModule):
    """Drop-in for Megatron-Core's ``DotProductAttention`` that runs ring attention over the context-parallel
    group.

    ``ring_group``, ``backend`` and ``ulysses_size`` are extras (set them through ``ModuleSpec.params``, see
    :func:`ring_gpt_layer_spec`): ``ring_group``, if given, must hold the same ranks as Megatron's
    context-parallel group (it documents and checks the caller's expectation; the ring always runs on the CP
    group, which is where Megatron split the sequence); ``backend`` forces a kernel backend;
    ``ulysses_size`` > 1 runs USP on a ``ulysses x ring`` mesh over the CP group (also chosen by
    ``cp_comm_type`` ``"a2a"`` / ``"a2a+p2p"``, see the module docstring).
    """

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None, *,
                 ring_group: Optional[dist.ProcessGroup] = None, backend: Optional[str] = None,
                 ulysses_size: Optional[int] = None):
        super().__init__(config=config)
        if attention_type != "self":
            raise NotImplementedError(f"attention_type: ring attention is self-attention over one sharded "
                                      f"sequence; got {attention_type!r} (cross-attention)")
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.no_mask):
            raise NotImplementedError(f"attn_mask_type: ring attention honours causal and unmasked attention; "
                                      f"got {attn_mask_type}")
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise NotImplementedError(f"attention_dropout: attention dropout is not supported by ring attention, "
                                      f"got {dropout}; set config.attention_dropout=0.0")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise NotImplementedError(f"softmax_type: only 'vanilla' softmax is supported, got {config.softmax_type!r}")
        if cp_comm_type not in (None, "p2p", "a2a", "a2a+p2p"):
            raise ValueError(f"cp_comm_type: ring attention runs 'p2p' (the ring), 'a2a' (Ulysses) or 'a2a+p2p' "
                             f"(USP), got {cp_comm_type!r}")

        self.cp_group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
        if self.cp_group is None:
            self.cp_group = parallel_state.get_context_parallel_group()
        if ring_group is not None and _group_ranks(ring_group) != _group_ranks(self.cp_group):
            raise ValueError(f"ring_group: must be Megatron's context-parallel group, where the sequence is split "
                             f"(ranks {_group_ranks(self.cp_group)}); got a group of ranks "
                             f"{_group_ranks(ring_group)}")
        tp_size = pg_collection.tp.size() if getattr(pg_collection, "tp", None) is not None else \
            parallel_state.get_tensor_model_parallel_world_size()
        for name in ("num_attention_heads", "num_query_groups"):
            if getattr(config, name) % tp_size:
                raise ValueError(f"config.{name}: must be divisible by the tensor-parallel size {tp_size}, "
                                 f"got {getattr(config, name)}")

        heads_per_tp_rank = config.num_attention_heads // tp_size
        ulysses_size = _ulysses_degree(config, cp_comm_type, ulysses_size, dist.get_world_size(self.cp_group))
        if heads_per_tp_rank % ulysses_size:
            raise ValueError(f"ulysses_size: the Ulysses degree {ulysses_size} must divide the attention heads of a "
                             f"tensor-parallel rank ({heads_per_tp_rank})")
        self.usp = usp_process_groups(ulysses_size, self.cp_group) if ulysses_size > 1 else None

        self.causal = attn_mask_type == AttnMaskType.causal
        self.layer_number = max(1, layer_number)
        self.head_dim = config.kv_channels
        self.hidden_size_per_partition = config.kv_channels * config.num_attention_heads // tp_size
        # query-key layer scaling divides the scores by the layer number and the softmax multiplies them back:
        # the net scale is softmax_scale either way
        self.softmax_scale = 1.0 / math.sqrt(self.head_dim) if softmax_scale is None else softmax_scale
        window = config.window_size if is_layer_window_attention(
            config.window_size, config.window_attn_skip_freq, layer_number) else None
        if window is not None and not self.causal:
            raise NotImplementedError("window_size: sliding windows are supported with causal attention only")
        self.window_size = tuple(window) if window is not None else (-1, -1)
        self.backend = backend

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias: Optional[torch.Tensor] = None, packed_seq_params=None) -> torch.Tensor:
        """``[s, b, heads, head_dim]`` q/k/v (K/V with ``num_query_groups`` heads) -> ``[s, b, hidden]``.

        With the causal mask type, ``attention_mask`` is not read (as in Megatron's Transformer Engine
        attention): the causal pattern follows from the ring layout's global positions.
        """
        if packed_seq_params is not None:
            raise NotImplementedError("packed_seq_params: packed sequences (THD format) are not supported by "
                                      "RingCoreAttention yet; pass one sequence per batch row")
        if attention_bias is not None:
            raise NotImplementedError("attention_bias: not supported by ring attention")
        if attn_mask_type is None:
            causal = self.causal
        elif attn_mask_type in (AttnMaskType.causal, AttnMaskType.no_mask):
            causal = attn_mask_type == AttnMaskType.causal
        else:
            raise NotImplementedError(f"attn_mask_type: ring attention honours causal and unmasked attention; "
                                      f"got {attn_mask_type}")
        if not causal and self.window_size != (-1, -1):
            raise NotImplementedError("window_size: sliding windows are supported with causal attention only")
        if not causal and attention_mask is not None:
            raise NotImplementedError("attention_mask: a padding or custom mask cannot be split over the ring")
        # Megatron's CP split is zigzag; without a causal mask every token sees every key, so token order does
        # not matter and the plain "ring" schedule serves any split.
        variant = "zigzag" if causal else "ring"
        q, k, v = (t.transpose(0, 1) for t in (query, key, value))
        common = dict(variant=variant, causal=causal, softmax_scale=self.softmax_scale, window_size=self.window_size,
                      backend=self.backend)
        if self.usp is not None:
            out, _ = usp_attention(q, k, v, **self.usp.attention_groups(), **common)
        else:
            out, _ = ring_attention(q, k, v, group=self.cp_group, **common)
        return out.transpose(0, 1).reshape(out.shape[1], out.shape[0], self.hidden_size_per_partition)


def _ulysses_degree(config, cp_comm_type: Optional[str], ulysses_size: Optional[int], cp_size: int) -> int:
    """The Ulysses degree asked for by ``cp_comm_type`` (Megatron's) or ``ulysses_size`` (ours); 1: the ring."""
    if ulysses_size is not None and (isinstance(ulysses_size, bool) or not isinstance(ulysses_size, int)
                                     or ulysses_size < 1):
        raise ValueError(f"ulysses_size: expected a positive int, got {ulysses_size!r}")
    if cp_comm_type == "a2a":
        implied = cp_size
    elif cp_comm_type == "a2a+p2p":
        sizes = getattr(config, "hierarchical_context_parallel_sizes", None)
        if not sizes or len(sizes) != 2 or sizes[0] * sizes[1] != cp_size:
            raise ValueError(f"config.hierarchical_context_parallel_sizes: cp_comm_type 'a2a+p2p' needs "
                             f"[ulysses, ring] sizes whose product is the CP size {cp_size}, got {sizes!r}")
        implied = sizes[0]
    else:
        implied = None
    if ulysses_size is not None and implied is not None and ulysses_size != implied:
        raise ValueError(f"ulysses_size: cp_comm_type {cp_comm_type!r} implies a Ulysses degree of {implied}, "
                         f"got ulysses_size={ulysses_size}")
    return implied or ulysses_size or 1


def ring_gpt_layer_spec(ring_group: Optional[dist.ProcessGroup] = None, backend: Optional[str] = None,
                        ulysses_size: Optional[int] = None, **local_spec_kwargs) -> ModuleSpec:
    """Megatron-Core's local GPT layer spec (``get_gpt_layer_local_spec(**local_spec_kwargs)``) with
    :class:`RingCoreAttention` as its core attention (``ulysses_size``: see there)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(**local_spec_kwargs)
    spec.submodules.self_attention.submodules.core_attention = ModuleSpec(
        module=RingCoreAttention, params={"ring_group": ring_group, "backend": backend, "ulysses_size": ulysses_size})
    return spec
