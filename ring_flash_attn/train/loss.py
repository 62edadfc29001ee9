"""The causal-LM loss without the logits: output projection + cross-entropy over chunks of tokens.

A model with a 128k-token vocabulary produces 0.5 MB of float32 logits per token; at 32k tokens that
is 16 GiB, more than every layer's checkpointed activations together. Here the loss runs over chunks of
tokens: each chunk's logits (in the compute dtype, as the model's own ``lm_head`` would give them) are
upcast to float32, reduced to the chunk's token losses, and turned at once into the chunk's gradients
with respect to the hidden states and the projection, so no more than one chunk's ``[tokens, vocab]``
tensor ever exists and nothing is recomputed in the backward (which only scales the gradients already
made by the incoming gradient of the loss). The chunk size comes from a memory budget
(``train.loss_chunk_mib``), not from a fixed count.

What the model's own head does after the projection is applied here too, in float32: Gemma's final
soft-capping (``final_logit_softcapping``), Cohere's ``logit_scale`` and Granite's ``logits_scaling``.
The tests compare this loss and its gradients with cross-entropy over the model's own logits for every
family the trainer's tests build.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MethodType
from typing import Callable, Optional

import torch
from torch import nn

from .data import IGNORE_INDEX

# Bytes per token and vocabulary entry that one chunk holds at once, beside two in the compute dtype (the
# logits as the projection gives them, and their gradient): the logits in float32 and the float32 softmax
# beside them (eagerly; compiled, the two fuse into fewer).
FLOAT32_BYTES_PER_LOGIT = 4 + 4
LOSS_METHOD = "token_loss_sum"  # the model method the trainer calls; FSDP treats it as a forward (fsdp.py)


@dataclass(frozen=True)
class LogitTransform:
    """What a family's head does to ``hidden @ weight.T`` before the softmax: ``softcap * tanh(z * scale /
    softcap)``, or ``z * scale`` without soft-capping."""

    scale: float = 1.0
    softcap: Optional[float] = None

    @classmethod
    def of(cls, hf_config) -> "LogitTransform":
        scale = float(getattr(hf_config, "logit_scale", None) or 1.0)           # Cohere: logits * logit_scale
        scaling = getattr(hf_config, "logits_scaling", None)                    # Granite: logits / logits_scaling
        if scaling:
            scale /= float(scaling)
        softcap = getattr(hf_config, "final_logit_softcapping", None)           # Gemma 2 and 3
        return cls(scale, float(softcap) if softcap else None)

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def chain(self, grad: torch.Tensor, transformed: torch.Tensor) -> torch.Tensor:
        """d loss / d z from d loss / d apply(z), in place; ``transformed`` is apply(z) (read with soft-capping
        only)."""
        if self.softcap is not None:
            grad.mul_(1 - (transformed / self.softcap) ** 2)
        if self.scale != 1.0:
            grad.mul_(self.scale)
        return grad


def chunk_tokens(vocab_size: int, compute_dtype: torch.dtype, budget_bytes: int) -> int:
    """Tokens per chunk so that one chunk's logits and their gradient stay within ``budget_bytes``."""
    element = torch.empty((), dtype=compute_dtype).element_size()
    per_token = vocab_size * (2 * element + FLOAT32_BYTES_PER_LOGIT)
    return max(1, budget_bytes // per_token)


_MIXED_PRODUCT_DEVICES = {"cuda"}  # where torch.addmm(..., out_dtype=) adds 16-bit products into float32


def _add_product(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``total += a @ b`` with ``total`` in float32 and ``a``, ``b`` possibly in a 16-bit dtype."""
    if a.dtype == total.dtype:
        total.addmm_(a, b)
        return
    if total.device.type in _MIXED_PRODUCT_DEVICES:
        try:  # cuBLAS sums the 16-bit products into the float32 total in place
            torch.addmm(total, a, b, out_dtype=total.dtype, out=total)
            return
        except (RuntimeError, TypeError, NotImplementedError):  # a torch without it: as elsewhere from now on
            _MIXED_PRODUCT_DEVICES.discard(total.device.type)
    # No mixed-dtype product here: the chunk's product is rounded once, then added in float32.
    total.add_(a @ b)


def softmax_cross_entropy(logits: torch.Tensor, target: torch.Tensor, transform: LogitTransform, want_grad: bool):
    """One chunk's (sum of token losses, gradient with respect to ``logits`` or None) from its raw logits in the
    compute dtype: the transform, a softmax in float32 (float64 for float64 logits), cross-entropy, and
    softmax - one-hot on the rows that are targets, back in the compute dtype. Elementwise and row reductions
    only: ``train.compile`` compiles it into a few fused kernels (apply_chunked_loss)."""
    softmax_dtype = torch.promote_types(logits.dtype, torch.float32)
    valid = target != IGNORE_INDEX
    index = target.clamp(min=0).unsqueeze(1)
    z = transform.apply(logits.to(softmax_dtype))
    lse = torch.logsumexp(z, dim=-1)
    loss = torch.where(valid, lse - z.gather(1, index).squeeze(1), 0.0).sum()
    if not want_grad:
        return loss, None
    grad = (z - lse.unsqueeze(1)).exp()
    grad = grad.scatter_add(1, index, -valid.unsqueeze(1).to(grad.dtype)) * valid.unsqueeze(1)
    return loss, transform.chain(grad, z).to(logits.dtype)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Sum over tokens of cross-entropy(transform(hidden @ weight.T), labels), chunk by chunk. The gradients are
    made in the forward, while each chunk's logits exist, and only scaled in the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk, transform, compute_dtype, elementwise):
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        matrix = weight.to(compute_dtype)
        softmax_dtype = torch.promote_types(compute_dtype, torch.float32)  # float32, or float64 for float64 models
        loss = torch.zeros((), device=hidden.device, dtype=softmax_dtype)
        grad_hidden = torch.empty_like(hidden, dtype=compute_dtype) if want_hidden else None
        # float32 across chunks: each chunk's product is rounded once, as one unchunked product would be.
        grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=softmax_dtype) if want_weight else None
        for start in range(0, hidden.shape[0], chunk):
            stop = min(start + chunk, hidden.shape[0])
            piece = hidden[start:stop].to(compute_dtype)
            chunk_loss, grad = elementwise(piece @ matrix.t(), labels[start:stop], transform,
                                           want_hidden or want_weight)
            loss += chunk_loss
            if want_hidden:
                torch.mm(grad, matrix, out=grad_hidden[start:stop])
            if want_weight:
                _add_product(grad_weight, grad.t(), piece)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = hidden.dtype, weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_loss.to(grad_hidden.dtype)).to(hidden_dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_loss).to(weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                             budget_bytes: int, transform: LogitTransform = LogitTransform(),
                             compute_dtype: Optional[torch.dtype] = None,
                             elementwise: Callable = softmax_cross_entropy) -> torch.Tensor:
    """Sum over tokens of ``cross_entropy(transform(hidden @ weight.T), labels)`` in float32 (float64 for a
    float64 model), labels equal to -100 left out, without materialising more than ``budget_bytes`` of logits
    at once.

    ``hidden``: [tokens, hidden_size]; ``weight``: [vocab, hidden_size]; ``labels``: [tokens]. The product
    runs in ``compute_dtype`` (default: the autocast dtype when autocast is on, else ``hidden``'s dtype), the
    softmax in float32, as ``cross_entropy(lm_head(hidden).float(), labels, reduction="sum")`` does.
    ``elementwise``: :func:`softmax_cross_entropy` or a compiled version of it.
    """
    if compute_dtype is None:
        device_type = hidden.device.type
        compute_dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                         else hidden.dtype)
    chunk = chunk_tokens(weight.shape[0], compute_dtype, budget_bytes)
    with torch.autocast(hidden.device.type, enabled=False):
        return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, chunk, transform, compute_dtype, elementwise)


def _token_loss_sum(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                    position_ids: torch.Tensor) -> torch.Tensor:
    """The model's next-token cross-entropy summed over ``labels`` (already shifted), in float32."""
    hidden = model.get_decoder()(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
    return linear_cross_entropy_sum(hidden.flatten(0, 1), model.get_output_embeddings().weight, labels.flatten(),
                                    budget_bytes=model._loss_budget_bytes, transform=LogitTransform.of(model.config),
                                    elementwise=model._loss_elementwise)


def apply_chunked_loss(model: nn.Module, budget_mib: float, compile_backend: Optional[str] = None) -> nn.Module:
    """Give ``model`` the method ``token_loss_sum(input_ids, labels, position_ids)``: the chunked loss of its
    decoder's last hidden states through its output embedding, with chunks of at most ``budget_mib``; with
    ``compile_backend``, each chunk's softmax and cross-entropy compiled (the projections are matrix products
    either way)."""
    model._loss_budget_bytes = int(budget_mib * 2 ** 20)
    model._loss_elementwise = (torch.compile(softmax_cross_entropy, backend=compile_backend, dynamic=False)
                               if compile_backend else softmax_cross_entropy)
    setattr(model, LOSS_METHOD, MethodType(_token_loss_sum, model))
    return model
