"""The replaced project's users' code, on every rank: each public function reached through each import path
that zhuzilin/ring-flash-attention documents, called once, against the float64 oracle."""

from __future__ import annotations

import importlib

import torch

from ring_flash_attn.ring.layouts import PackedLayout, get_layout
from tests.distributed.workers import _cumsum, make_inputs, oracle, packed_oracle
from tests.tolerances import rel_err

# Module path -> the public names that project's module defines (its __init__ re-exports all of them).
MODULES = {
    "ring_flash_attn.ring_flash_attn": ("ring", ("func", "kvpacked_func", "qkvpacked_func")),
    "ring_flash_attn.zigzag_ring_flash_attn": ("zigzag", ("func", "kvpacked_func", "qkvpacked_func")),
    "ring_flash_attn.stripe_flash_attn": ("stripe", ("func", "kvpacked_func", "qkvpacked_func")),
    "ring_flash_attn.ring_flash_attn_varlen": ("ring", ("varlen_func", "varlen_kvpacked_func",
                                                        "varlen_qkvpacked_func")),
    "ring_flash_attn.zigzag_ring_flash_attn_varlen": ("zigzag", ("varlen_func", "varlen_kvpacked_func",
                                                                 "varlen_qkvpacked_func")),
    "ring_flash_attn.llama3_flash_attn_varlen": ("llama3", ("varlen_func", "varlen_kvpacked_func",
                                                            "varlen_qkvpacked_func")),
}
PREFIX = {"ring": "ring_flash_attn", "zigzag": "zigzag_ring_flash_attn", "stripe": "stripe_flash_attn",
          "llama3": "llama3_flash_attn"}
HEADS, HEADS_K, DIM = 4, 4, 8  # qkvpacked needs as many K/V heads as query heads
SEQLENS = (4, 8, 12)  # global lengths of the packed sequences, per world size unit (scaled by 2P below)


def _packed_args(suffix: str, q, k, v):
    """The function's leading tensor arguments for its packing (func / kvpacked / qkvpacked)."""
    dim = q.dim() - 2  # the stacked dimension: 2 for [B, S, (2|3), H, D], 1 for varlen [T, (2|3), H, D]
    if suffix.endswith("qkvpacked_func"):
        return (torch.stack((q, k, v), dim=dim),)
    if suffix.endswith("kvpacked_func"):
        return q, torch.stack((k, v), dim=dim)
    return q, k, v


def _leaf_grads(args):
    return [a.grad for a in args]


def dropin_errors(rank, world_size, seed):
    """{"module.function": {"out", "lse", "grad"}: relative errors}, plus the names found at the top level."""
    import ring_flash_attn

    results = {}
    for module_path, (variant, suffixes) in MODULES.items():
        module = importlib.import_module(module_path)
        for n, suffix in enumerate(suffixes):
            name = f"{PREFIX[variant]}_{suffix}"
            fn = getattr(module, name)
            assert fn is getattr(ring_flash_attn, name), f"{module_path}.{name} is not the top-level function"
            case_seed = seed + 100 * len(results) + n
            if suffix.startswith("varlen"):
                results[f"{module_path}.{name}"] = _varlen_errors(fn, variant, suffix, rank, world_size, case_seed)
            else:
                results[f"{module_path}.{name}"] = _dense_errors(fn, variant, suffix, rank, world_size, case_seed)
    return results


def _dense_errors(fn, variant, suffix, rank, world_size, seed):
    causal = variant != "ring"  # zigzag and stripe are causal layouts; ring runs non-causal here
    case = dict(batch=2, seqlen=4 * world_size, heads=HEADS, heads_k=HEADS_K, head_dim=DIM, seed=seed)
    q, k, v, dout = make_inputs(case)
    ref = oracle(q, k, v, dout, causal=causal, window=(-1, -1), scale=DIM ** -0.5)
    layout = get_layout(variant)
    local = lambda x, dim=1: layout.shard(x, rank, world_size, dim)  # noqa: E731
    args = [a.detach().requires_grad_() for a in _packed_args(suffix, *(local(t) for t in (q, k, v)))]
    out, lse, _ = fn(*args, causal=causal, return_attn_probs=True)
    out.backward(local(dout))
    want_grads = _packed_args(suffix, *(local(g) for g in ref[2:]))
    return {"out": rel_err(out, local(ref[0])), "lse": rel_err(lse, local(ref[1], dim=2)),
            "grad": max(rel_err(g, w) for g, w in zip(_leaf_grads(args), want_grads))}


def _varlen_errors(fn, variant, suffix, rank, world_size, seed):
    import ring_flash_attn

    causal = variant != "ring"
    seqlens = tuple(2 * world_size * n for n in SEQLENS)
    case = dict(batch=1, seqlen=sum(seqlens), heads=HEADS, heads_k=HEADS_K, head_dim=DIM, seed=seed)
    q, k, v, dout = make_inputs(case)
    ref = packed_oracle(q, k, v, dout, seqlens, causal=causal, window=(-1, -1), scale=DIM ** -0.5)
    if variant == "llama3":  # contiguous pieces of the packed row, prepared by the project's helper
        piece = sum(seqlens) // world_size
        local = lambda x, dim=1: x.narrow(dim, rank * piece, piece)[0]  # noqa: E731
        cu_seqlens = torch.tensor(_cumsum(seqlens), dtype=torch.int32)
        prepared = ring_flash_attn.llama3_flash_attn_varlen.llama3_flash_attn_prepare_cu_seqlens(
            cu_seqlens, causal, rank, world_size)
        extra = (*prepared[:4], 1, prepared[4])  # heads_k_stride = 1
    else:  # each sequence laid out over the ranks by the variant; local cu_seqlens
        layout = PackedLayout(get_layout(variant), tuple(n // world_size for n in seqlens))
        local = lambda x, dim=1: layout.shard(x, rank, world_size, dim)[0]  # noqa: E731
        local_lengths = layout.seqlens_local
        extra = (torch.tensor(_cumsum(local_lengths), dtype=torch.int32), max(local_lengths))
    args = [a.detach().requires_grad_() for a in _packed_args(suffix, *(local(t) for t in (q, k, v)))]
    out, lse, _ = fn(*args, *extra, causal=causal, return_attn_probs=True)
    out.backward(local(dout))
    want_grads = _packed_args(suffix, *(local(g) for g in ref[2:]))
    return {"out": rel_err(out, local(ref[0])), "lse": rel_err(lse, local(ref[1], dim=2)),
            "grad": max(rel_err(g, w) for g, w in zip(_leaf_grads(args), want_grads))}
