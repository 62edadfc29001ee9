"""The engine over the loopback communicator on CUDA against the float64 oracle.

The loopback copies K/V on a side stream while the kernels run; a missing
stream dependency or a buffer freed too early (the race the anchors describe)
would show here as an error above tolerance, varying from run to run.
"""

import pytest
import torch

from ring_flash_attn import ring_attention
from ring_flash_attn.comm.loopback import LoopbackComm
from ring_flash_attn.kernels import get_backend
from ring_flash_attn.ring.layouts import get_layout
from tests.tolerances import FORWARD, GRADIENT, rel_err

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")]


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
@pytest.mark.parametrize("variant,causal", [("ring", False), ("zigzag", True), ("stripe", True)])
def test_loopback_ring_matches_oracle(backend, variant, causal):
    world_size, seqlen, h, hk, d, dtype = 4, 4 * 512, 8, 2, 128, torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(int(torch.randint(0, 2 ** 31 - 1, ()).item()))
    # Drawn in the low-precision dtype, so the oracle sees exactly the inputs the ring sees.
    q, dout = (torch.randn(1, seqlen, h, d, device="cuda", generator=g).to(dtype).double() for _ in range(2))
    k, v = (torch.randn(1, seqlen, hk, d, device="cuda", generator=g).to(dtype).double() for _ in range(2))
    oracle = get_backend("reference")
    kw = dict(scale=d ** -0.5, causal=causal)
    ref_out, ref_lse = oracle.forward(q, k, v, **kw)
    ref_dq = oracle.backward(dout, q, k, v, ref_out, ref_lse, **kw)[0]
    layout = get_layout(variant)
    shard = lambda x, r, dim=1: layout.shard(x, r, world_size, dim)  # noqa: E731
    kv_by_rank = [torch.stack((shard(k, r), shard(v, r))).to(dtype) for r in range(world_size)]
    for rank in range(world_size):
        ql = shard(q, rank).to(dtype).requires_grad_()
        out, lse = ring_attention(ql, kv_by_rank[rank][0], kv_by_rank[rank][1], variant=variant, causal=causal,
                                  backend=backend, comm=LoopbackComm(rank, kv_by_rank))
        out.backward(shard(dout, rank).to(dtype))
        assert rel_err(out, shard(ref_out, rank)) <= FORWARD[dtype], f"rank {rank} out"
        assert rel_err(lse, shard(ref_lse, rank, dim=2)) <= FORWARD[torch.float32], f"rank {rank} lse"
        assert rel_err(ql.grad, shard(ref_dq, rank)) <= GRADIENT[dtype], f"rank {rank} dq"


@pytest.mark.parametrize("variant,causal", [("ring", False), ("zigzag", True)])
def test_ring_schedule_captured_in_a_cuda_graph_matches_the_plain_one_and_the_oracle(variant, causal):
    """The engine's forward and backward over the loopback, captured in one CUDA graph (benchmarks' --graph
    variant) and replayed on fresh inputs copied into its static tensors: the same results as the plain call
    on those inputs (within rounding: cuDNN's backward may sum in another order) and the float64 oracle's."""
    from ring_flash_attn.bench import graphed
    from ring_flash_attn.kernels.mask import Band
    from ring_flash_attn.ring import RingPlan, ring_backward, ring_forward

    world_size, seqlen, h, hk, d, dtype, rank = 4, 4 * 256, 8, 2, 128, torch.bfloat16, 2
    layout = get_layout(variant)
    shard = lambda x, r, dim=1: layout.shard(x, r, world_size, dim)  # noqa: E731
    static_q = torch.empty(1, seqlen // world_size, h, d, device="cuda", dtype=dtype)
    static_dout = torch.empty_like(static_q)
    static_kv = [torch.empty(2, 1, seqlen // world_size, hk, d, device="cuda", dtype=dtype) for _ in range(world_size)]
    plan = RingPlan(layout=layout, band=Band.from_kernel_args(causal, (-1, -1)), scale=d ** -0.5, softcap=0.0,
                    backend=get_backend("sdpa"), comm=LoopbackComm(rank, static_kv))
    results = []

    def schedule():
        out, lse = ring_forward(static_q, static_kv[rank][0], static_kv[rank][1], plan)
        dq = ring_backward(static_dout, static_q, static_kv[rank][0], static_kv[rank][1], out, lse, plan)[0]
        results[:] = [out, lse, dq]

    g = torch.Generator(device="cuda").manual_seed(int(torch.randint(0, 2 ** 31 - 1, ()).item()))

    def fresh_inputs():
        q, dout = (torch.randn(1, seqlen, h, d, device="cuda", generator=g).to(dtype).double() for _ in range(2))
        k, v = (torch.randn(1, seqlen, hk, d, device="cuda", generator=g).to(dtype).double() for _ in range(2))
        static_q.copy_(shard(q, rank))
        static_dout.copy_(shard(dout, rank))
        for r in range(world_size):
            static_kv[r].copy_(torch.stack((shard(k, r), shard(v, r))))
        return q, k, v, dout

    fresh_inputs()
    replay = graphed(schedule)
    captured = list(results)  # the graph's static outputs (the plain calls below put theirs in `results`)
    for _ in range(2):  # two replays on two sets of inputs: the graph reads its static tensors anew each time
        q, k, v, dout = fresh_inputs()
        replay()
        graph_out, graph_lse, graph_dq = (t.clone() for t in captured)
        schedule()  # the plain call on the same inputs
        plain_out, plain_lse, plain_dq = results
        oracle = get_backend("reference")
        kw = dict(scale=d ** -0.5, causal=causal)
        ref_out, ref_lse = oracle.forward(q, k, v, **kw)
        ref_dq = oracle.backward(dout, q, k, v, ref_out, ref_lse, **kw)[0]
        assert rel_err(graph_out, plain_out) <= FORWARD[dtype] / 4
        assert rel_err(graph_lse, plain_lse) <= FORWARD[torch.float32] / 4
        assert rel_err(graph_dq, plain_dq) <= GRADIENT[dtype] / 4
        assert rel_err(graph_out, shard(ref_out, rank)) <= FORWARD[dtype]
        assert rel_err(graph_lse, shard(ref_lse, rank, dim=2)) <= FORWARD[torch.float32]
        assert rel_err(graph_dq, shard(ref_dq, rank)) <= GRADIENT[dtype]


@pytest.mark.parametrize("variant,lengths,count,path", [
    ("zigzag", (1, 2, 3, 5), 300, "varlen"), ("ring", (1, 4, 7), 200, "varlen"), ("stripe", (1, 3), 64, "varlen"),
    ("zigzag", (1, 2, 3, 5), 300, "batched"), ("ring", (1, 4, 7), 200, "batched"), ("zigzag", (1,), 4200, "batched")])
def test_packed_batch_of_many_sequences_matches_oracle(variant, lengths, count, path, monkeypatch):
    """The default backend on a packed batch of many short sequences against each sequence's float64 oracle
    (out, LSE, dQ over the loopback), through both ways ring/batching.py makes few calls of many blocks:
    ``varlen``, FlashAttention-2's variable-length call for a step's unmasked blocks and one for its causal
    squares (what bf16 takes); ``batched``, one call per block shape on a batch of their rows (what the
    backend does where it has no variable-length call). With 4200 sequences of one token per rank half, a
    batch holds 4200 blocks x 16 heads: more programs than a CUDA grid's y size, so the merge runs in parts."""
    import random

    from ring_flash_attn.kernels.mask import Band
    from ring_flash_attn.kernels.sdpa import SdpaBackend
    from ring_flash_attn.ring.batching import TaskBatch, step_calls
    from ring_flash_attn.ring.layouts import PackedLayout
    from tests.distributed.workers import packed_oracle
    from tests.gpu.packed import check_packed_ranks

    varlen_calls = []
    if path == "batched":
        monkeypatch.setattr(SdpaBackend, "serves_varlen", lambda self, features: False)
    forward_varlen = SdpaBackend.forward_varlen
    monkeypatch.setattr(SdpaBackend, "forward_varlen", lambda self, *a, **kw: (
        varlen_calls.append(1), forward_varlen(self, *a, **kw))[1])
    world_size, h, hk, d, dtype = 4, 16, 4, 64, torch.bfloat16
    unit = get_layout(variant).chunks_per_rank * world_size
    rng = random.Random(int(torch.randint(0, 2 ** 31 - 1, ()).item()))
    seqlens = tuple(unit * rng.choice(lengths) for _ in range(count))
    layout = PackedLayout(get_layout(variant), tuple(n // world_size for n in seqlens))
    total_local = sum(layout.seqlens_local)
    batches = [c for src in range(world_size)
               for c in step_calls(layout, 0, src, world_size, total_local, Band.from_kernel_args(True, (-1, -1)))
               if isinstance(c, TaskBatch)]
    if count > 4000:
        assert max(len(b) for b in batches) * h > 65535
    g = torch.Generator(device="cuda").manual_seed(rng.randrange(2 ** 31))
    q, dout = (torch.randn(1, sum(seqlens), h, d, device="cuda", generator=g).to(dtype).double() for _ in range(2))
    k, v = (torch.randn(1, sum(seqlens), hk, d, device="cuda", generator=g).to(dtype).double() for _ in range(2))
    ref = packed_oracle(q, k, v, dout, seqlens, causal=True, window=(-1, -1), scale=d ** -0.5)
    check_packed_ranks(layout, world_size, (q, k, v, dout), ref, dtype, (variant, count, path))
    assert bool(varlen_calls) == (path == "varlen"), len(varlen_calls)  # the path the case is about ran


@pytest.mark.parametrize("world_size,path", [(4, "varlen"), (8, "varlen"), (4, "batched")])
def test_llama3_document_pieces_match_oracle(world_size, path, monkeypatch):
    """The llama3 exchange (the trainer's document masking) on documents of 1-300 tokens crossing the ranks'
    contiguous pieces: each piece is the unmasked block of its document's earlier keys and the causal square of
    its own (llama3._llama3_blocks), made as FlashAttention-2 variable-length calls (``varlen``, bf16's path) or
    plain and batched cuDNN calls (``batched``), through the engine's per-call steps on the whole sequence's K/V
    (what the all-gather hands every rank): out, LSE, dQ per rank and dK/dV summed, against float64."""
    import random

    from ring_flash_attn.kernels.sdpa import SdpaBackend
    from ring_flash_attn.ring.planner import clear_plan_caches
    from tests.distributed.workers import packed_oracle
    from tests.gpu.packed import check_llama3_pieces

    if path == "batched":
        monkeypatch.setattr(SdpaBackend, "serves_varlen", lambda self, features: False)
    h, hk, d, dtype = 16, 4, 128, torch.bfloat16
    rng = random.Random(int(torch.randint(0, 2 ** 31 - 1, ()).item()))
    seqlens = [rng.randint(1, 300) for _ in range(96)]
    seqlens[-1] += -sum(seqlens) % world_size
    g = torch.Generator(device="cuda").manual_seed(rng.randrange(2 ** 31))
    q, dout = (torch.randn(1, sum(seqlens), h, d, device="cuda", generator=g).to(dtype).double() for _ in range(2))
    k, v = (torch.randn(1, sum(seqlens), hk, d, device="cuda", generator=g).to(dtype).double() for _ in range(2))
    ref = packed_oracle(q, k, v, dout, seqlens, causal=True, window=(-1, -1), scale=d ** -0.5)
    clear_plan_caches()
    made = check_llama3_pieces(seqlens, world_size, (q, k, v, dout), ref, dtype, "sdpa", (path, world_size))
    assert (made >= world_size) if path == "varlen" else made == 0, made
    clear_plan_caches()


@pytest.mark.parametrize("path", ["varlen", "batched"])
def test_allgather_exchange_of_a_packed_batch_matches_oracle(path, monkeypatch):
    """The load-balanced all-gather exchange (zigzag, ``ring_attention(exchange="allgather")``) on 256 packed
    sequences: every source's ring step calls with keys moved into the gathered K/V (ring/allgather.py), as
    FlashAttention-2 variable-length calls or batched plain calls, through the engine's per-call steps."""
    import random

    from ring_flash_attn.kernels.sdpa import SdpaBackend
    from ring_flash_attn.ring.layouts import PackedLayout
    from ring_flash_attn.ring.planner import clear_plan_caches
    from tests.distributed.workers import packed_oracle
    from tests.gpu.packed import check_allgather_ranks

    if path == "batched":
        monkeypatch.setattr(SdpaBackend, "serves_varlen", lambda self, features: False)
    world_size, h, hk, d, dtype = 4, 16, 4, 128, torch.bfloat16
    rng = random.Random(int(torch.randint(0, 2 ** 31 - 1, ()).item()))
    seqlens = [2 * world_size * rng.choice((1, 2, 3, 5, 16)) for _ in range(256)]
    layout = PackedLayout(get_layout("zigzag"), tuple(n // world_size for n in seqlens))
    g = torch.Generator(device="cuda").manual_seed(rng.randrange(2 ** 31))
    q, dout = (torch.randn(1, sum(seqlens), h, d, device="cuda", generator=g).to(dtype).double() for _ in range(2))
    k, v = (torch.randn(1, sum(seqlens), hk, d, device="cuda", generator=g).to(dtype).double() for _ in range(2))
    ref = packed_oracle(q, k, v, dout, seqlens, causal=True, window=(-1, -1), scale=d ** -0.5)
    clear_plan_caches()
    made = check_allgather_ranks(layout, world_size, (q, k, v, dout), ref, dtype, "sdpa", (path,))
    assert (made >= world_size) if path == "varlen" else made == 0, made
    clear_plan_caches()
