"""The docstrings of the public functions, written once: the argument texts every variant shares, and the
per-variant layout, composed by :func:`compat_docstring` (what ``help()`` shows for each function)."""

from __future__ import annotations

import textwrap

LAYOUTS = {
    "ring": ("contiguous shards: with P ranks and S_local tokens per rank, rank r passes tokens "
             "[r * S_local, (r + 1) * S_local) of the sequence. Causal or not; under a causal mask the last "
             "rank does P times the work of the first."),
    "zigzag": ("the sequence cut into 2P equal chunks, rank r passing chunks r and 2P-1-r one after the "
               "other (every rank does the same causal work). Causal only; S_local must be even."),
    "stripe": ("token t on rank t mod P: rank r passes tokens r, r + P, r + 2P, ... (balanced causal work, "
               "one kernel call per step). Causal only."),
}

TENSORS = {
    "func": """\
    q: (batch_size, seqlen_local, nheads, headdim), float16, bfloat16, float32 or float64: this rank's queries.
    k: (batch_size, seqlen_local, nheads_k, headdim): this rank's keys; nheads_k must divide nheads (GQA/MQA).
    v: (batch_size, seqlen_local, nheads_k, headdim): this rank's values.""",
    "kvpacked_func": """\
    q: (batch_size, seqlen_local, nheads, headdim), float16, bfloat16, float32 or float64: this rank's queries.
    kv: (batch_size, seqlen_local, 2, nheads_k, headdim): this rank's keys and values; nheads_k must divide
        nheads (GQA/MQA).""",
    "qkvpacked_func": """\
    qkv: (batch_size, seqlen_local, 3, nheads, headdim), float16, bfloat16, float32 or float64: this rank's
        queries, keys and values.""",
    "varlen_func": """\
    q: (total_tokens_local, nheads, headdim), float16, bfloat16, float32 or float64: this rank's queries of
        every packed sequence, one sequence after the other.
    k: (total_tokens_local, nheads_k, headdim): keys; nheads_k must divide nheads (GQA/MQA).
    v: (total_tokens_local, nheads_k, headdim): values.""",
    "varlen_kvpacked_func": """\
    q: (total_tokens_local, nheads, headdim), float16, bfloat16, float32 or float64: this rank's queries of
        every packed sequence, one sequence after the other.
    kv: (total_tokens_local, 2, nheads_k, headdim): keys and values; nheads_k must divide nheads.""",
    "varlen_qkvpacked_func": """\
    qkv: (total_tokens_local, 3, nheads, headdim), float16, bfloat16, float32 or float64: this rank's queries,
        keys and values of every packed sequence, one sequence after the other.""",
}

VARLEN = """\
    cu_seqlens: (nseqs + 1,), int32 or int64 (int64 is converted once): this rank's cumulative local
        sequence lengths, from 0 to total_tokens_local (the global cumulative lengths divided by P). Each
        packed sequence is laid out over the ranks by the layout above on its own, so each global length
        must split into P equal parts (2P for zigzag). Repeated offsets (empty sequences) are allowed.
    max_seqlen: int: at least the longest local sequence (checked; the lengths come from cu_seqlens).
    (alibi_slopes below: one slope per head, (nheads,), with packed sequences.)"""

COMMON = """\
    dropout_p: float. Must be 0.0: attention dropout is not implemented (NotImplementedError otherwise).
    softmax_scale: float > 0 and finite, or None. The scaling of QK^T before the softmax; None:
        1 / sqrt(headdim). 0, negative, NaN and inf raise ValueError.
    causal: bool. Causal mask by true token positions in the whole sequence, across ranks.
    window_size: (left, right), ints >= -1. Sliding-window attention by true positions: the query at
        position i sees the keys at positions [i - left, i + right]; -1 means unbounded (as in flash-attn).
        Floats, strings and inf raise ValueError.
    alibi_slopes: (nheads,) or (batch_size, nheads), float32, or None. Adds -slope * |i - j| (true token
        distance) to the scores; served by the "reference" backend (automatic choice falls back to it).
    deterministic: bool. Accepted for compatibility: the ring's own reductions (LSE merges, gradient sums,
        batched write-backs) are in a fixed order. A fused kernel's backward may accumulate with atomics
        (FlashAttention-2 on CUDA); for bitwise-repeatable gradients there, use
        torch.use_deterministic_algorithms(True), which PyTorch passes to those kernels.
    return_attn_probs: bool. Also return the log-sum-exp of each query row (the attention probabilities
        themselves are never materialised; their slot is None).
    group: torch.distributed.ProcessGroup or None. The ranks that share the sequence (default: the world);
        every rank of it must make the same call.
    softcap: float, keyword-only. Logit soft-capping softcap * tanh(scores / softcap) (Gemma 2); 0 = off.
    backend: str or None, keyword-only. Force a kernel backend ("sdpa", "triton", "sycl", "reference");
        default: chosen by device, dtype and features (or the RING_FLASH_ATTN_BACKEND variable)."""

RAISES = """\
Raises:
    ValueError, TypeError: a bad shape, dtype, device, window, length for the layout or cu_seqlens, naming
        the argument, what was expected and what was given; raised alike on every rank before any
        communication, so no rank is left waiting.
    NotImplementedError: dropout_p > 0, or a feature the forced backend cannot serve (e.g. softcap with
        "sdpa"), naming the backend and the reason."""


def returns(varlen: bool) -> str:
    shape = "(total_tokens_local, nheads, headdim)" if varlen else "(batch_size, seqlen_local, nheads, headdim)"
    lse = "(nheads, total_tokens_local)" if varlen else "(batch_size, nheads, seqlen_local)"
    return f"""\
Returns:
    out: {shape}, q's dtype: this rank's output, in the same layout
        as q. Differentiable: the backward runs the same ring (gradients for this rank's q, k and v).
    With return_attn_probs=True: (out, softmax_lse, None); softmax_lse {lse},
        float32, natural log. Differentiable: a loss that uses softmax_lse gets its gradient (that backward
        runs the ring on twice the heads: twice the compute and transfers)."""


def compat_docstring(name: str, variant: str, suffix: str) -> str:
    """The docstring of one replaced-project function, e.g. ``zigzag_ring_flash_attn_varlen_func``."""
    varlen = suffix.startswith("varlen")
    what = "over packed variable-length sequences " if varlen else ""
    lines = [_fill(f"Context-parallel attention {what}in the {variant!r} layout, as "
                   f"zhuzilin/ring-flash-attention's {name}."),
             "",
             _fill("Every rank of ``group`` calls it with its own slice of the sequence"
                   + (" (of each packed sequence)" if varlen else "") + ": " + LAYOUTS[variant]
                   + " Keys and values travel around the ring of ranks; no rank holds the whole sequence."),
             "",
             "Arguments:",
             TENSORS[suffix]]
    if varlen:
        lines.append(VARLEN)
    lines += [COMMON, "", returns(varlen), "", RAISES]
    if variant in ("zigzag", "stripe"):
        lines[-1] += "\n    ValueError: causal=False (this layout balances causal attention only)."
    return "\n".join(lines)


def _fill(paragraph: str) -> str:
    return textwrap.fill(paragraph, width=100, break_on_hyphens=False)


LLAMA3_TENSORS = {
    "varlen_func": """\
    q: (total_tokens_local, nheads, headdim), float16, bfloat16, float32 or float64: this rank's piece.
    k, v: (total_tokens_local, nheads_k, headdim); nheads_k must divide nheads (GQA/MQA).""",
    "varlen_kvpacked_func": """\
    q: (total_tokens_local, nheads, headdim), float16, bfloat16, float32 or float64: this rank's piece.
    kv: (total_tokens_local, 2, nheads_k, headdim); nheads_k must divide nheads (GQA/MQA).""",
    "varlen_qkvpacked_func": """\
    qkv: (total_tokens_local, 3, nheads, headdim), float16, bfloat16, float32 or float64: this rank's piece.""",
}


def llama3_docstring(name: str, suffix: str) -> str:
    """The docstring of the replaced project's all-gather ("llama3") functions."""
    return "\n".join([
        _fill(f"Context-parallel attention over packed sequences by all-gather (\"llama3\"), as "
              f"zhuzilin/ring-flash-attention's {name}."),
        "",
        _fill("Every rank of ``group`` passes its contiguous piece of the packed batch (rank r: tokens "
              "[r * total_tokens / P, (r + 1) * total_tokens / P); sequences may cross pieces and be shorter "
              "than P). K/V are all-gathered heads_k_stride heads at a time, overlapped with compute, and "
              "dK/dV reduce-scattered; K/V memory grows with P."),
        "",
        "Arguments:",
        LLAMA3_TENSORS[suffix],
        """\
    cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, local_k_slice: this rank's values from
        llama3_flash_attn_prepare_cu_seqlens(cu_seqlens, causal, rank, world_size).
    heads_k_stride: int: K/V heads gathered at a time, a divisor of nheads_k (smaller: less memory).""",
        COMMON, "", returns(varlen=True), "", RAISES])


def zigzag_llama3_docstring() -> str:
    return "\n".join([
        _fill("Load-balanced all-gather attention over packed sequences: the inputs and cu_seqlens of "
              "zigzag_ring_flash_attn_varlen_func (each sequence in the zigzag layout on its own), the "
              "exchange of llama3_flash_attn_varlen_func (K/V all-gathered heads_k_stride heads at a time, "
              "dK/dV reduce-scattered), so every rank does the same causal work."),
        "",
        "Arguments:",
        TENSORS["varlen_func"], VARLEN,
        "    heads_k_stride: int: K/V heads gathered at a time, a divisor of nheads_k (smaller: less memory).",
        COMMON, "", returns(varlen=True), "", RAISES])


def prepare_cu_seqlens_docstring() -> str:
    return """\
The per-rank arguments of llama3_flash_attn_varlen_func for a packed batch.

Arguments:
    cu_seqlens: (nseqs + 1,), int32 or int64: cumulative lengths of the WHOLE packed batch (all ranks'
        pieces together), from 0 to total_tokens, which must be divisible by world_size. Rank r holds
        tokens [r * total_tokens / world_size, (r + 1) * total_tokens / world_size).
    causal: bool: whether the attention is causal (this rank's keys then end with its piece).
    rank, world_size: int: this rank's index in the context-parallel group and the group's size.

Returns:
    (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, local_k_slice): int32 cumulative lengths of
    this rank's query pieces and of their keys, the longest of each, and the slice of the gathered keys
    (every rank's tokens in rank order) that this rank's keys come from.

Raises:
    ValueError: cu_seqlens is not a cumulative-length vector, or total_tokens is not divisible by
        world_size."""
