"""Token-wise modules over tiles of tokens, each tile recomputed in the backward: MLPs and norms.

What a decoder layer keeps for its backward grows with the sequence, and most of it belongs to modules
that act on each token alone. A Llama-3.2-1B layer's gated MLP keeps four [tokens, 8192] intermediates
(gate, up, the activation and its product: 64 KiB a token in bf16, 64 GiB at a million tokens), and each
RMSNorm keeps its input upcast to float32 and its normalised output (12 KiB a token at width 2048). Such a
module can run over tiles of tokens, each tile a ``torch.utils.checkpoint`` region (non-reentrant, nested
inside the layer's own activation checkpoint): only its input stays, and at most one tile's
intermediates exist at a time, forward or backward.

A tile costs one more forward of the module in the backward, so tiles are made only where a sequence's
intermediates would exceed the budget ``train.tile_mib``: shorter sequences run every module as they
always did. Modules are tiled in place (their ``forward`` replaced on the instance), so parameter names,
checkpoints and exported models are unchanged. Tiled: each decoder layer's ``mlp``, the norms that are
direct children of a decoder layer, and the decoder's final norm.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .fsdp import decoder_layers

# Intermediates of a gated MLP per token and intermediate feature, kept for the backward: gate and up
# projections, the activation of the gate, and its product with up.
GATED_INTERMEDIATES = 4


def mlp_bytes_per_token(intermediate_size: int, element_size: int) -> int:
    return GATED_INTERMEDIATES * intermediate_size * element_size


def norm_bytes_per_token(hidden_size: int, element_size: int) -> int:
    """An RMSNorm's intermediates: its input in float32, the normalised value and the scaled output."""
    return hidden_size * (4 + 2 * element_size)


def tile_tokens(bytes_per_token: int, budget_bytes: int) -> int:
    """Tokens per tile whose intermediates fit ``budget_bytes``."""
    return max(1, budget_bytes // bytes_per_token)


def _tiled_forward(forward: Callable, bytes_per_token: Callable[[int], int], budget_bytes: int,
                   hidden: torch.Tensor) -> torch.Tensor:
    tile = tile_tokens(bytes_per_token(hidden.element_size()), budget_bytes)
    tokens = hidden.shape[:-1].numel()
    if tokens <= tile:
        return forward(hidden)
    # Tiles of [1, tile, features]: a module written for [batch, seq, features] (a mixture of experts) reads
    # them as one short sequence. split (not slicing): its backward concatenates the tiles' gradients once
    # instead of adding each into a zero tensor of the whole sequence.
    flat = hidden.reshape(1, tokens, hidden.shape[-1])
    run = functools.partial(checkpoint, forward, use_reentrant=False) if torch.is_grad_enabled() else forward
    outputs = [run(piece) for piece in flat.split(tile, dim=1)]
    if not isinstance(outputs[0], torch.Tensor):
        raise TypeError(f"tiling: the module returned {type(outputs[0]).__name__}, not a tensor of the tokens' "
                        f"outputs; set train.tile_mib 0 to run it untiled")
    return torch.cat(outputs, dim=1).reshape(*hidden.shape[:-1], outputs[0].shape[-1])


def _tile(module: nn.Module, bytes_per_token: Callable[[int], int], budget: int) -> None:
    module.forward = functools.partial(_tiled_forward, module.forward, bytes_per_token, budget)


def _intermediate_size(mlp: nn.Module, config) -> int:
    """The MLP's intermediate features per token; for a mixture of experts, those of the experts a token uses."""
    size = getattr(mlp, "intermediate_size", None)
    if size is None:
        widths = [m.out_features for m in mlp.modules() if isinstance(m, nn.Linear)]
        size = max(widths, default=0)
    experts = getattr(config, "num_experts_per_tok", None)
    if experts:
        size = max(size, experts * (getattr(config, "moe_intermediate_size", None) or config.intermediate_size))
    return int(size)


def is_norm(module: nn.Module) -> bool:
    """transformers' RMSNorm classes (one per family) and PyTorch's own norms: each normalises a token alone."""
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith("RMSNorm")


def _width(norm: nn.Module) -> int:
    weight = getattr(norm, "weight", None)
    return int(weight.shape[-1]) if weight is not None else int(norm.normalized_shape[-1])


def apply_tiling(model: nn.Module, budget_mib: float) -> nn.Module:
    """Tile the MLPs and norms of ``model`` in place, tiles of at most ``budget_mib`` of intermediates (0: no
    tiling); a module that does not return one tensor raises TypeError at its first tiled call."""
    budget = int(budget_mib * 2 ** 20)
    if budget <= 0:
        return model
    norms = []
    for layer in decoder_layers(model):
        mlp = getattr(layer, "mlp", None)
        if mlp is None:
            raise TypeError(f"{type(layer).__name__}: expected its MLP at .mlp, as transformers' decoder layers "
                            f"keep it; set train.tile_mib 0 to run it untiled")
        _tile(mlp, functools.partial(mlp_bytes_per_token, _intermediate_size(mlp, model.config)), budget)
        norms += [child for child in layer.children() if is_norm(child)]
    final = getattr(model.get_decoder(), "norm", None)
    if final is not None and is_norm(final):
        norms.append(final)
    for norm in norms:
        _tile(norm, functools.partial(norm_bytes_per_token, _width(norm)), budget)
    return model
