"""Rank functions for tests/distributed/test_api_hostile.py (module level, so the harness can pickle them): the
library API under hostile use (issue 25), all in one world."""

from __future__ import annotations

import threading

import torch
import torch.distributed as dist

import ring_flash_attn as rfa
from ring_flash_attn.kernels import get_backend, register_backend
from ring_flash_attn.kernels.base import KernelBackend
from ring_flash_attn.ring.layouts import PackedLayout, get_layout
from tests.distributed.hostile_workers import _raised
from tests.distributed.workers import _cumsum, make_inputs, oracle, packed_oracle
from tests.tolerances import rel_err

NAMES = ("out", "lse", "dq", "dk", "dv")


# ---------------------------------------------------------------------------------------------------------------
# Inputs in layouts the fused kernels do not read as they are (issue 25, item 1).


def strided_head_dim(x: torch.Tensor) -> torch.Tensor:
    """``x``'s values with head_dim at stride 2 (``buffer[..., ::2]``)."""
    strided = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)[..., ::2]
    return strided.copy_(x)


def offset_heads_major(x: torch.Tensor) -> torch.Tensor:
    """``x``'s values at a storage offset of 3 elements, heads before tokens in memory (``[B, H, S, D]``
    storage seen as ``[B, S, H, D]``); a 3-d ``[T, H, D]`` is stored as ``[H, T, D]``."""
    storage = torch.empty(x.numel() + 3, dtype=x.dtype)[3:]
    if x.dim() == 3:
        return storage.view(x.shape[1], x.shape[0], x.shape[2]).transpose(0, 1).copy_(x)
    b, s, h, d = x.shape
    return storage.view(b, h, s, d).transpose(1, 2).copy_(x)


def _odd_inputs(q, k, v, dout):
    """Leaves with odd layouts and their values: q and dout strided in head_dim, k offset and heads-major, v
    one value per row expanded over head_dim (stride 0, its gradient summed into the one value).
    Returns (q, k, v_leaf, v, dout): v_leaf is what gets the gradient of v."""
    v_leaf = v[..., :1].clone().requires_grad_()
    return (strided_head_dim(q).requires_grad_(), offset_heads_major(k).requires_grad_(), v_leaf,
            v_leaf.expand(v.shape), strided_head_dim(dout))


def _errors(got, want) -> dict:
    return {name: rel_err(g, w) for name, g, w in zip(NAMES, got, want)}


def odd_layout_errors(rank, world_size) -> dict:
    """Ring, all-gather, varlen, llama3 and Ulysses calls (default backend: sdpa on CPU) on inputs in odd layouts,
    against the float64 oracle: {path: {out, lse, dq, dk, dv: relative error}}."""
    results = {}
    case = dict(batch=2, seqlen=4 * world_size, heads=world_size * 2, heads_k=world_size, head_dim=8, seed=71)
    q, k, v, dout = make_inputs(case)
    v = v[..., :1].expand(v.shape).contiguous()  # one value per row: the values of the expanded v below
    ref = oracle(q, k, v, dout, causal=True, window=(-1, -1), scale=8 ** -0.5)
    local = lambda x, dim=1: rfa.shard_sequence(x, "zigzag", rank, world_size, dim)  # noqa: E731
    want = (local(ref[0]), local(ref[1], 2), local(ref[2]), local(ref[3]), local(ref[4]).sum(-1, keepdim=True))

    def run(name, attend):
        ql, kl, v_leaf, vl, doutl = _odd_inputs(*(local(t) for t in (q, k, v, dout)))
        out, lse = attend(ql, kl, vl)
        out.backward(doutl)
        results[name] = _errors((out, lse, ql.grad, kl.grad, v_leaf.grad), want)

    for exchange in ("ring", "allgather"):
        run(f"{exchange} exchange", lambda ql, kl, vl: rfa.ring_attention(
            ql, kl, vl, variant="zigzag", causal=True, exchange=exchange, heads_k_stride=1))
    run("ulysses", lambda ql, kl, vl: rfa.ulysses_attention(ql, kl, vl, variant="zigzag", causal=True))
    run("zigzag_ring_flash_attn_func", lambda ql, kl, vl: rfa.zigzag_ring_flash_attn_func(
        ql, kl, vl, causal=True, return_attn_probs=True)[:2])

    # Packed sequences: zigzag varlen over the ring, and the replaced project's contiguous llama3 pieces.
    seqlens = (2 * world_size, 6 * world_size)
    q, k, v, dout = make_inputs(dict(case, batch=1, seqlen=sum(seqlens), seed=72))
    v = v[..., :1].expand(v.shape).contiguous()
    ref = packed_oracle(q, k, v, dout, seqlens, causal=True, window=(-1, -1), scale=8 ** -0.5)
    layout = PackedLayout(get_layout("zigzag"), tuple(n // world_size for n in seqlens))
    local = lambda x, dim=1: layout.shard(x, rank, world_size, dim)[0]  # noqa: E731
    want = (local(ref[0]), local(ref[1], 2), local(ref[2]), local(ref[3]), local(ref[4]).sum(-1, keepdim=True))
    cu = torch.tensor(_cumsum(layout.seqlens_local), dtype=torch.int32)
    run("zigzag varlen", lambda ql, kl, vl: rfa.zigzag_ring_flash_attn_varlen_func(
        ql, kl, vl, cu, max(layout.seqlens_local), causal=True, return_attn_probs=True)[:2])

    piece = sum(seqlens) // world_size
    local = lambda x, dim=1: x.narrow(dim, rank * piece, piece)[0]  # noqa: E731
    want = (local(ref[0]), local(ref[1], 2), local(ref[2]), local(ref[3]), local(ref[4]).sum(-1, keepdim=True))
    args = rfa.llama3_flash_attn_prepare_cu_seqlens(torch.tensor(_cumsum(seqlens), dtype=torch.int32), True, rank,
                                                    world_size)
    run("llama3 varlen", lambda ql, kl, vl: rfa.llama3_flash_attn_varlen_func(
        ql, kl, vl, *args[:4], 1, args[4], causal=True, return_attn_probs=True)[:2])
    return results


# ---------------------------------------------------------------------------------------------------------------
# Threads (item 2).


def call_errors(rank, world_size, seed, group=None, backward_on_thread=False) -> float:
    """One zigzag call (reference backend) over ``group`` on fresh inputs, its backward on another thread if
    asked; the largest relative error of out/lse/dq/dk/dv against the float64 oracle."""
    q, k, v, dout = make_inputs(dict(batch=1, seqlen=4 * world_size, heads=4, heads_k=2, head_dim=8, seed=seed))
    ref = oracle(q, k, v, dout, causal=True, window=(-1, -1), scale=8 ** -0.5)
    local = lambda x, dim=1: rfa.shard_sequence(x, "zigzag", rank, world_size, dim)  # noqa: E731
    ql, kl, vl = (local(t).requires_grad_() for t in (q, k, v))
    out, lse = rfa.ring_attention(ql, kl, vl, variant="zigzag", causal=True, group=group, backend="reference")
    if backward_on_thread:
        backward = threading.Thread(target=out.backward, args=(local(dout),), name="backward")
        backward.start()
        backward.join(60)
    else:
        out.backward(local(dout))
    want = (local(ref[0]), local(ref[1], 2), local(ref[2]), local(ref[3]), local(ref[4]))
    return max(rel_err(g, w) for g, w in zip((out, lse, ql.grad, kl.grad, vl.grad), want))


class GateBackend(KernelBackend):
    """The reference kernels; once armed, the next forward call sets ``entered`` and waits (at most 30 s) for
    ``go``: a call held in flight while another thread tries the same group."""

    name = "test_gate"

    def __init__(self):
        self.reference, self.entered, self.go = get_backend("reference"), None, None

    def unsupported_reason(self, features):
        return None

    def forward(self, q, k, v, **kw):
        if self.entered is not None:
            entered, self.entered = self.entered, None
            entered.set()
            self.go.wait(30)
        return self.reference.forward(q, k, v, **kw)

    def backward(self, dout, q, k, v, out, lse, **kw):
        return self.reference.backward(dout, q, k, v, out, lse, **kw)


def threads(rank, world_size) -> dict:
    """Two threads on one group at once: the second raises at once, the first at its end, on every rank; then the
    group serves a clean call. Two threads on two groups at once, and a backward on another thread: exact."""
    gate = GateBackend()
    register_backend(gate)
    q, k, v, _ = (rfa.shard_sequence(t, "zigzag", rank, world_size)
                  for t in make_inputs(dict(batch=1, seqlen=4 * world_size, heads=4, heads_k=2, head_dim=8, seed=5)))
    gate.entered, gate.go = threading.Event(), threading.Event()
    report = {}

    def first():
        report["first"] = _raised(lambda: rfa.zigzag_ring_flash_attn_func(q, k, v, causal=True, backend=gate.name))

    held = threading.Thread(target=first, name="first")
    held.start()
    gate.entered.wait(30)
    report["second"] = _raised(lambda: rfa.zigzag_ring_flash_attn_func(q, k, v, causal=True))
    gate.go.set()
    held.join(60)
    report["after"] = call_errors(rank, world_size, seed=6)

    groups = [dist.new_group(list(range(world_size))) for _ in range(2)]
    errors = {}

    def on_own_group(n):
        errors[n] = call_errors(rank, world_size, seed=7 + n, group=groups[n])

    workers = [threading.Thread(target=on_own_group, args=(n,), name=f"group {n}") for n in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    report["own groups"] = [errors.get(n, float("inf")) for n in range(2)]
    report["backward on a thread"] = call_errors(rank, world_size, seed=9, backward_on_thread=True)
    return report


# ---------------------------------------------------------------------------------------------------------------
# The LSE's gradient (item 5).


def lse_oracle(q, k, v, dout, lse_weight, seqlens=None, **kw):
    """out, lse and the gradients of ``sum(out * dout) + sum(lse * lse_weight)`` (either term may be None) by
    float64 autograd through the reference math on the whole sequence (each packed sequence on its own)."""
    reference = get_backend("reference")
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    bounds = _cumsum(seqlens or (q.shape[1],))
    parts = [reference.forward(q[:, a:b], k[:, a:b], v[:, a:b], **kw) for a, b in zip(bounds, bounds[1:]) if b > a]
    out, lse = torch.cat([o for o, _ in parts], 1), torch.cat([l_ for _, l_ in parts], 2)
    loss = sum((t * w).sum() for t, w in ((out, dout), (lse, lse_weight)) if w is not None)
    return (out, lse, *torch.autograd.grad(loss, (q, k, v), allow_unused=True, materialize_grads=True))


def lse_gradient_errors(rank, world_size) -> dict:
    """``sum(out * dout) + sum(lse * w)`` and ``sum(lse * w)`` alone through every exchange, against float64
    autograd of full attention: {case: {out, lse, dq, dk, dv: relative error}}."""
    results = {}
    case = dict(batch=2, seqlen=4 * world_size, heads=2 * world_size, heads_k=world_size, head_dim=8, seed=81)
    q, k, v, dout = make_inputs(case)
    weight = torch.randn(2, 2 * world_size, 4 * world_size, generator=torch.Generator().manual_seed(82),
                         dtype=torch.float64)
    slopes = torch.rand(2 * world_size, generator=torch.Generator().manual_seed(83)) * 0.5 + 0.1
    local = lambda x, dim=1: rfa.shard_sequence(x, "zigzag", rank, world_size, dim)  # noqa: E731

    def run(name, attend, use_out=True, dtype=torch.float64, alibi=None):
        ref = lse_oracle(q, k, v, dout if use_out else None, weight, causal=True, window=(-1, -1), scale=8 ** -0.5,
                         **({} if alibi is None else dict(alibi_slopes=alibi.double(), alibi_delta=0, alibi_stride=1)))
        ql, kl, vl = (local(t).to(dtype).requires_grad_() for t in (q, k, v))
        out, lse = attend(ql, kl, vl)
        loss = (lse * local(weight, 2).to(lse.dtype)).sum()
        if use_out:
            loss = loss + (out * local(dout).to(dtype)).sum()
        loss.backward()
        want = (local(ref[0]), local(ref[1], 2), local(ref[2]), local(ref[3]), local(ref[4]))
        results[name] = _errors((out, lse, ql.grad, kl.grad, vl.grad), want)

    zigzag = dict(variant="zigzag", causal=True)
    run("ring", lambda *t: rfa.ring_attention(*t, **zigzag))
    run("ring, the LSE alone", lambda *t: rfa.ring_attention(*t, **zigzag), use_out=False)
    run("ring, bfloat16", lambda *t: rfa.ring_attention(*t, **zigzag), dtype=torch.bfloat16)
    run("ring, ALiBi", lambda *t: rfa.ring_attention(*t, **zigzag, alibi_slopes=slopes), alibi=slopes)
    run("allgather", lambda *t: rfa.ring_attention(*t, **zigzag, exchange="allgather", heads_k_stride=1))
    run("zigzag_ring_flash_attn_func", lambda *t: rfa.zigzag_ring_flash_attn_func(
        *t, causal=True, return_attn_probs=True)[:2])
    run("ulysses", lambda *t: rfa.ulysses_attention(*t, **zigzag))
    run("ulysses, the LSE alone", lambda *t: rfa.ulysses_attention(*t, **zigzag), use_out=False)

    # Packed sequences: zigzag varlen over the ring, and llama3's contiguous pieces.
    seqlens = (2 * world_size, 6 * world_size)
    q, k, v, dout = make_inputs(dict(case, batch=1, seqlen=sum(seqlens), seed=84))
    weight = torch.randn(1, case["heads"], sum(seqlens), generator=torch.Generator().manual_seed(85),
                         dtype=torch.float64)
    ref = lse_oracle(q, k, v, dout, weight, seqlens, causal=True, window=(-1, -1), scale=8 ** -0.5)

    def run_packed(name, local, attend):
        ql, kl, vl = (local(t).requires_grad_() for t in (q, k, v))
        out, lse = attend(ql, kl, vl)
        ((out * local(dout)).sum() + (lse * local(weight, 2)).sum()).backward()
        want = (local(ref[0]), local(ref[1], 2), local(ref[2]), local(ref[3]), local(ref[4]))
        results[name] = _errors((out, lse, ql.grad, kl.grad, vl.grad), want)

    layout = PackedLayout(get_layout("zigzag"), tuple(n // world_size for n in seqlens))
    cu = torch.tensor(_cumsum(layout.seqlens_local), dtype=torch.int32)
    run_packed("zigzag varlen", lambda x, dim=1: layout.shard(x, rank, world_size, dim)[0],
               lambda *t: rfa.zigzag_ring_flash_attn_varlen_func(*t, cu, max(layout.seqlens_local), causal=True,
                                                                 return_attn_probs=True)[:2])
    piece = sum(seqlens) // world_size
    args = rfa.llama3_flash_attn_prepare_cu_seqlens(torch.tensor(_cumsum(seqlens), dtype=torch.int32), True, rank,
                                                    world_size)
    run_packed("llama3 varlen", lambda x, dim=1: x.narrow(dim, rank * piece, piece)[0],
               lambda *t: rfa.llama3_flash_attn_varlen_func(*t, *args[:4], 1, args[4], causal=True,
                                                            return_attn_probs=True)[:2])
    return results


def lse_gradient_on_one_rank(rank, world_size) -> tuple:
    """Rank 0 alone puts the LSE in its loss (RING_FLASH_ATTN_AGREE=always: a lone change is named before any
    exchange): what each rank raised in the backward, then a clean call's error."""
    import os

    os.environ["RING_FLASH_ATTN_AGREE"] = "always"
    try:
        q, k, v = (rfa.shard_sequence(t, "zigzag", rank, world_size).requires_grad_() for t in make_inputs(
            dict(batch=1, seqlen=4 * world_size, heads=4, heads_k=2, head_dim=8, seed=86))[:3])
        out, lse = rfa.ring_attention(q, k, v, variant="zigzag", causal=True)
        raised = _raised(lambda: (out.sum() + (lse.sum() if rank == 0 else 0)).backward())
    finally:
        del os.environ["RING_FLASH_ATTN_AGREE"]
    return raised, call_errors(rank, world_size, seed=87)


# ---------------------------------------------------------------------------------------------------------------
# torch.compile (item 8).


def compiled(rank, world_size) -> dict:
    """fullgraph=True over the attention: what it raised; fullgraph=False: the error against the oracle (forward
    and backward through the compiled caller, the attention run eagerly between its graphs)."""
    q, k, v, dout = make_inputs(dict(batch=1, seqlen=4 * world_size, heads=4, heads_k=2, head_dim=8, seed=91))
    ref = oracle(q, k, v, dout, causal=True, window=(-1, -1), scale=8 ** -0.5)
    local = lambda x, dim=1: rfa.shard_sequence(x, "zigzag", rank, world_size, dim)  # noqa: E731
    report = {}

    def around_attention(ql, kl, vl):
        q_same = ql.relu() - (-ql).relu()  # q again, computed in the graph around the attention
        return rfa.zigzag_ring_flash_attn_func(q_same, kl, vl, causal=True, return_attn_probs=True)[:2]

    whole = torch.compile(around_attention, backend="eager", fullgraph=True)
    report["fullgraph function"] = _raised(lambda: whole(*(local(t) for t in (q, k, v))))
    module = torch.compile(rfa.RingAttention(variant="zigzag", causal=True), backend="eager", fullgraph=True)
    report["fullgraph module"] = _raised(lambda: module(*(local(t) for t in (q, k, v))))

    def attention_between_graphs(ql, kl, vl):
        q_same = ql.relu() - (-ql).relu()  # q again, computed in the graph around the attention
        return rfa.zigzag_ring_flash_attn_func(q_same, kl, vl, causal=True, return_attn_probs=True)[:2]

    ql, kl, vl = (local(t).requires_grad_() for t in (q, k, v))
    out, lse = torch.compile(attention_between_graphs, backend="aot_eager")(ql, kl, vl)
    out.backward(local(dout))
    want = (local(ref[0]), local(ref[1], 2), local(ref[2]), local(ref[3]), local(ref[4]))
    report["between graphs"] = max(rel_err(g, w) for g, w in zip((out, lse, ql.grad, kl.grad, vl.grad), want))
    return report


# ---------------------------------------------------------------------------------------------------------------
# Arguments that must raise the same clear error on every rank, before any exchange.


def _bad_calls(rank, world_size) -> dict:
    """name -> a call that must raise on every rank (the test holds what each must say)."""
    g = torch.Generator().manual_seed(11)
    t = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    q, k = t(1, 4, 2 * world_size, 8), t(1, 4, world_size, 8)
    full = t(1, 4 * world_size, 2, 8)
    tokens = t(8, 2 * world_size, 8), t(8, world_size, 8), t(8, world_size, 8)
    cu = torch.tensor([0, 4, 8], dtype=torch.int32)
    llama3 = rfa.llama3_flash_attn_prepare_cu_seqlens(torch.tensor([0, 4 * world_size, 8 * world_size],
                                                                   dtype=torch.int32), True, rank, world_size)
    return {
        "softmax_scale nan": lambda: rfa.ring_flash_attn_func(q, k, k, softmax_scale=float("nan")),
        "softmax_scale inf": lambda: rfa.zigzag_ring_flash_attn_func(q, k, k, softmax_scale=float("inf"), causal=True),
        "softmax_scale 0, causal": lambda: rfa.ring_attention(q, k, k, softmax_scale=0.0, causal=True),
        "softmax_scale negative, allgather": lambda: rfa.ring_attention(q, k, k, softmax_scale=-0.5,
                                                                        exchange="allgather"),
        "softmax_scale 0, varlen": lambda: rfa.ring_flash_attn_varlen_func(*tokens, cu, 4, softmax_scale=0),
        "softmax_scale negative, llama3": lambda: rfa.llama3_flash_attn_varlen_func(
            *tokens, *llama3[:4], 1, llama3[4], softmax_scale=-1.0, causal=True),
        "softmax_scale 0, ulysses": lambda: rfa.ulysses_attention(q, k, k, softmax_scale=0.0),
        "softmax_scale a string": lambda: rfa.ring_flash_attn_func(q, k, k, softmax_scale="0.5"),
        "softmax_scale a bool": lambda: rfa.ring_flash_attn_func(q, k, k, softmax_scale=True),
        "window_size inf": lambda: rfa.ring_flash_attn_func(q, k, k, window_size=float("inf")),
        "window_size a string": lambda: rfa.zigzag_ring_flash_attn_func(q, k, k, causal=True, window_size="12"),
        "window_size a float": lambda: rfa.ring_attention(q, k, k, window_size=(2.5, -1)),
        "window_size inf in the pair, llama3": lambda: rfa.llama3_flash_attn_varlen_func(
            *tokens, *llama3[:4], 1, llama3[4], window_size=(float("inf"), -1), causal=True),
        "window_size a float, ulysses": lambda: rfa.ulysses_attention(q, k, k, window_size=(2.0, 3)),
        "RingAttention window_size a string": lambda: rfa.RingAttention(window_size="12"),
        "RingAttention softmax_scale 0": lambda: rfa.RingAttention(softmax_scale=0),
        "cu_seqlens on meta, varlen": lambda: rfa.ring_flash_attn_varlen_func(*tokens, cu.to("meta"), 4),
        "cu_seqlens on meta, ring_attention": lambda: rfa.ring_attention(*tokens, cu_seqlens=cu.to("meta")),
        "cu_seqlens on meta, llama3 prepare": lambda: rfa.llama3_flash_attn_prepare_cu_seqlens(
            cu.to("meta"), True, rank, world_size),
        "cu_seqlens on meta, ulysses": lambda: rfa.ulysses_attention(*tokens, cu_seqlens=cu.to("meta")),
        "q, k, v on meta": lambda: rfa.ring_attention(q.to("meta"), k.to("meta"), k.to("meta")),
        "under torch.func.vmap": lambda: torch.func.vmap(lambda x: rfa.ring_attention(x, k, k))(q.unsqueeze(0)),
        "causal a string": lambda: rfa.ring_flash_attn_func(q, k, k, causal="False"),
        "causal None, llama3": lambda: rfa.llama3_flash_attn_varlen_func(*tokens, *llama3[:4], 1, llama3[4],
                                                                         causal=None),
        "causal a string, ulysses": lambda: rfa.ulysses_attention(q, k, k, causal="True"),
        "RingAttention causal a string": lambda: rfa.RingAttention(causal="yes"),
        "softcap a string": lambda: rfa.ring_attention(q, k, k, softcap="5", backend="reference"),
        "group a list of ranks": lambda: rfa.ring_flash_attn_func(q, k, k, group=list(range(world_size))),
        "group a list of ranks, ulysses": lambda: rfa.ulysses_attention(q, k, k, group=list(range(world_size))),
        "alibi_slopes requiring a gradient": lambda: rfa.ring_attention(
            q, k, k, alibi_slopes=torch.full((2 * world_size,), 0.25, requires_grad=True)),
        "shard_sequence rank = world_size": lambda: rfa.shard_sequence(full, "zigzag", world_size, world_size),
        "shard_sequence negative rank": lambda: rfa.shard_sequence(full, "ring", -1, world_size),
        "shard_sequence world_size 0": lambda: rfa.shard_sequence(full, "ring", 0, 0),
        "shard_sequence rank a float": lambda: rfa.shard_sequence(full, "ring", 1.0, world_size),
        "shard_sequence dim out of range": lambda: rfa.shard_sequence(full, "ring", rank, world_size, dim=4),
        "unshard_sequence no shards": lambda: rfa.unshard_sequence([], "ring"),
        "unshard_sequence shapes differ": lambda: rfa.unshard_sequence([full, full[:, :2]], "ring"),
        "gather_sequence dim out of range": lambda: rfa.gather_sequence(q, "zigzag", dim=-5),
        "gather_sequence 1-d slice": lambda: rfa.gather_sequence(q[0, 0, 0], "ring", dim=0),
        "gather_sequence bad variant": lambda: rfa.gather_sequence(q, "zig-zag"),
        "RingAttention.shard dim out of range": lambda: rfa.RingAttention().shard(full, dim=9),
        "RingAttention.gather dim out of range": lambda: rfa.RingAttention().gather(q, dim=9),
    }


def bad_calls(rank, world_size) -> tuple:
    """What each bad call raised on this rank, then the error of a clean call on the same group."""
    report = {name: _raised(call) for name, call in _bad_calls(rank, world_size).items()}
    x = torch.randn(1, 4, 2, 8)
    report["gather_sequence dim out of range on rank 0 alone"] = _raised(
        lambda: rfa.gather_sequence(x, "ring", dim=7 if rank == 0 else 1))
    return report, call_errors(rank, world_size, seed=12)


def api_hostile_world(rank, world_size):
    """Every check of this module in one world (one start of the ranks)."""
    return {"odd_layouts": odd_layout_errors(rank, world_size), "threads": threads(rank, world_size),
            "bad_calls": bad_calls(rank, world_size), "lse_gradient": lse_gradient_errors(rank, world_size),
            "lse_gradient_on_one_rank": lse_gradient_on_one_rank(rank, world_size),
            "compiled": compiled(rank, world_size)}
