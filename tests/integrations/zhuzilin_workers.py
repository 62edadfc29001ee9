"""zhuzilin/ring-flash-attention's internals as its clients use them, on every rank of the transformers test world.

Each check is written the way a client's code uses the names (read from axolotl, prime-rl, OpenRLHF and that
project's own modules; none of their code is copied) and compared with float64 full attention (or the same model
without context parallelism) on one process:

* ``ring_flash_attn.utils``: a user's own causal ring attention (forward and backward) from ``RingComm`` and
  ``update_out_and_lse``, and a user's all-gather attention (prime-rl's pattern) from ``AllGatherComm`` and
  ``get_default_args``: out, LSE, dq, dk, dv.
* ``ring_flash_attn.adapters.hf_adapter``: ``DATA_PARAMS`` as filled by ``update_ring_flash_attn_params`` fed to
  ``llama3_flash_attn_varlen_func`` (prime-rl); ``create_ring_flash_attention_forward`` replaced in that module
  before ``substitute_hf_flash_attn`` (axolotl's varlen path); ``check_params`` and ``flash_attention_forward``
  around a client's own ``_flash_attention_forward`` calling ``ring_flash_attn_func`` (axolotl's batch path); a
  non-causal encoder (BERT) through the substitution; the README order (load, then substitute).
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ring_flash_attn.kernels import get_backend
from tests.distributed.workers import make_inputs, oracle, packed_oracle
from tests.integrations.common import outcome_of
from tests.integrations.hf_workers import (EXACT_EAGER, SEQLEN, make_batch, make_models, make_packed_batch,
                                           packed_reference_run, reduce_grads, register_exact_eager, tiny_config,
                                           worst_grad_error)
from tests.tolerances import rel_err

HEADS, DIM = 2, 8
REFERENCE = get_backend("reference")


def _errors(got, want) -> dict:
    return {name: rel_err(g, w) for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want)}


def ring_comm_errors(rank, world_size, seed):
    """Causal attention over contiguous pieces, as a user writes it from RingComm and update_out_and_lse: K/V
    travel the ring (send_recv_kv) while each rank folds its blocks into (out, lse); in the backward each K/V
    block travels with its gradient sums (send_recv, commit, wait) and is home after a full turn."""
    from ring_flash_attn.utils import RingComm, update_out_and_lse

    seqlen_local = 4
    q, k, v, dout = make_inputs(dict(batch=2, seqlen=seqlen_local * world_size, heads=HEADS, heads_k=HEADS,
                                     head_dim=DIM, seed=seed))
    scale = DIM ** -0.5
    want = oracle(q, k, v, dout, causal=True, window=(-1, -1), scale=scale)
    mine = slice(rank * seqlen_local, (rank + 1) * seqlen_local)
    q, k, v, dout = (t[:, mine].contiguous() for t in (q, k, v, dout))

    comm = RingComm(None)
    out = lse = None
    k_cur, v_cur = k, v
    for step in range(world_size):
        if step + 1 < world_size:
            next_k, next_v = comm.send_recv_kv(k_cur, v_cur)
        if step <= rank:  # block of rank - step: earlier tokens, all visible; our own block: causal
            block_out, block_lse = REFERENCE.forward(q, k_cur, v_cur, scale=scale, causal=step == 0)
            out, lse = update_out_and_lse(out, lse, block_out, block_lse)
        if step + 1 < world_size:
            comm.wait()
            k_cur, v_cur = next_k, next_v
    out, lse = out.to(q.dtype), lse.squeeze(-1).transpose(1, 2)

    dq = torch.zeros_like(q)
    k_cur, v_cur, dk_cur, dv_cur = k, v, torch.zeros_like(k), torch.zeros_like(v)
    for step in range(world_size):
        if step <= rank:
            block_dq, block_dk, block_dv = REFERENCE.backward(dout, q, k_cur, v_cur, out, lse, scale=scale,
                                                              causal=step == 0)
            dq += block_dq
            dk_cur, dv_cur = dk_cur + block_dk, dv_cur + block_dv
        moving = RingComm(None)
        received = [moving.send_recv(t) for t in (k_cur, v_cur, dk_cur, dv_cur)]
        moving.commit()
        moving.wait()
        k_cur, v_cur, dk_cur, dv_cur = received
    want_local = (want[0][:, mine], want[1][:, :, mine], *(g[:, mine] for g in want[2:]))
    errors = _errors((out, lse, dq, dk_cur, dv_cur), want_local)
    unused = RingComm(None)  # refused before anything is sent, alike on every rank
    errors["refused"] = {"non_contiguous": outcome_of(lambda: unused.send_recv(k.transpose(1, 2))),
                         "recv_shape": outcome_of(lambda: unused.send_recv(k, torch.empty(3, dtype=k.dtype))),
                         "wait_before_commit": outcome_of(unused.wait)}
    return errors


def all_gather_comm_errors(rank, world_size, seed, heads_k_stride=1):
    """prime-rl's pattern: K/V gathered ``heads_k_stride`` heads at a time with AllGatherComm (the next chunk in
    flight while the current one computes), a local kernel called with arguments built by get_default_args, the
    gradients of the gathered K/V reduce-scattered back. One causal sequence in contiguous pieces."""
    from ring_flash_attn.utils import AllGatherComm, get_default_args

    seqlen_local = 4
    heads_k = 2
    q, k, v, dout = make_inputs(dict(batch=1, seqlen=seqlen_local * world_size, heads=2 * heads_k, heads_k=heads_k,
                                     head_dim=DIM, seed=seed))
    scale = DIM ** -0.5
    want = oracle(q, k, v, dout, causal=True, window=(-1, -1), scale=scale)
    mine = slice(rank * seqlen_local, (rank + 1) * seqlen_local)
    q, k, v, dout = (t[0, mine].contiguous() for t in (q, k, v, dout))  # varlen layout [tokens, heads, dim]

    def local_forward(q, k, v, softmax_scale, causal, q_offset=0, softcap=None):  # a flash-attn-like kernel
        out, lse = REFERENCE.forward(q[None], k[None], v[None], scale=softmax_scale, causal=causal,
                                     q_offset=q_offset, softcap=softcap)
        return out[0], lse[0]

    groups = q.shape[1] // heads_k
    chunks = [(slice(h * groups, (h + heads_k_stride) * groups), slice(h, h + heads_k_stride))
              for h in range(0, heads_k, heads_k_stride)]

    def gathered(comm, buffers, kv_heads):
        comm.all_gather(buffers[0], k[:, kv_heads].contiguous())
        comm.all_gather(buffers[1], v[:, kv_heads].contiguous())

    def new_buffers():
        return torch.empty(2, world_size * seqlen_local, heads_k_stride, DIM, dtype=k.dtype)

    comm = AllGatherComm(None)
    outs, lses, kv_all = [], [], {}
    current, following = new_buffers(), new_buffers()
    gathered(comm, current, chunks[0][1])
    for n, (q_heads, kv_heads) in enumerate(chunks):
        comm.wait()
        if n + 1 < len(chunks):
            gathered(comm, following, chunks[n + 1][1])
        params = get_default_args(local_forward).copy()
        params.update(q=q[:, q_heads], k=current[0], v=current[1], softmax_scale=scale, causal=True,
                      q_offset=rank * seqlen_local)
        assert params["softcap"] == 0.0, "get_default_args sets softcap to 0.0"
        out_n, lse_n = local_forward(**params)
        outs.append(out_n)
        lses.append(lse_n)
        kv_all[n] = current.clone()
        current, following = following, current
    out, lse = torch.cat(outs, dim=1), torch.cat(lses, dim=0)

    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    for n, (q_heads, kv_heads) in enumerate(chunks):
        k_all, v_all = kv_all[n]
        dq_n, dk_all, dv_all = REFERENCE.backward(dout[None, :, q_heads], q[None, :, q_heads], k_all[None],
                                                  v_all[None], out[None, :, q_heads], lse[None, q_heads],
                                                  scale=scale, causal=True, q_offset=rank * seqlen_local)
        dq[:, q_heads] = dq_n[0]
        dk_mine, dv_mine = torch.empty_like(k[:, kv_heads]), torch.empty_like(v[:, kv_heads])
        dist.reduce_scatter_tensor(dk_mine, dk_all[0].contiguous())
        dist.reduce_scatter_tensor(dv_mine, dv_all[0].contiguous())
        dk[:, kv_heads], dv[:, kv_heads] = dk_mine, dv_mine
    want_local = (want[0][0, mine], want[1][0, :, mine], *(g[0, mine] for g in want[2:]))
    errors = _errors((out, lse, dq, dk, dv), want_local)
    errors["refused"] = outcome_of(lambda: AllGatherComm(None).all_gather(torch.empty(3, dtype=k.dtype), k))
    return errors


def data_params_errors(rank, world_size, seed):
    """prime-rl: its own attention layer reads DATA_PARAMS, filled by update_ring_flash_attn_params, and calls
    llama3_flash_attn_varlen_func with them on [tokens, heads, dim] (packed sequences crossing the pieces)."""
    from ring_flash_attn import llama3_flash_attn_varlen_func, update_ring_flash_attn_params

    lengths = (3, 9, 4 * world_size - 12) if world_size > 3 else (3, 5)
    total = sum(lengths)
    q, k, v, dout = make_inputs(dict(batch=1, seqlen=total, heads=4, heads_k=2, head_dim=DIM, seed=seed))
    want = packed_oracle(q, k, v, dout, lengths, causal=True, window=(-1, -1), scale=DIM ** -0.5)
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    update_ring_flash_attn_params(cu_seqlens, None)
    from ring_flash_attn.adapters.hf_adapter import DATA_PARAMS  # read after the update, as prime-rl's layer does

    piece = total // world_size
    mine = slice(rank * piece, (rank + 1) * piece)
    args = [t[0, mine].detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse, _ = llama3_flash_attn_varlen_func(
        *args, cu_seqlens_q=DATA_PARAMS["cu_seqlens_q"], cu_seqlens_k=DATA_PARAMS["cu_seqlens_k"],
        max_seqlen_q=DATA_PARAMS["max_seqlen_q"], max_seqlen_k=DATA_PARAMS["max_seqlen_k"],
        local_k_slice=DATA_PARAMS["local_k_slice"], causal=True, window_size=(-1, -1), group=None, heads_k_stride=1,
        return_attn_probs=True)
    out.backward(dout[0, mine])
    want_local = (want[0][0, mine], want[1][0, :, mine], *(g[0, mine] for g in want[2:]))
    return _errors((out, lse, *(a.grad for a in args)), want_local)


def _packed_model_errors(rank, world_size, model, reference, input_ids, position_ids, labels, lengths):
    """Contiguous pieces of one packed row through ``model`` (substituted) against ``reference`` per sequence."""
    ref_logits, _, ref_grads = reference
    piece = input_ids.shape[1] // world_size
    mine = slice(rank * piece, (rank + 1) * piece)
    n_targets = int((labels != -100).sum())
    logits = model(input_ids=input_ids[:, mine], position_ids=position_ids[:, mine]).logits
    loss = F.cross_entropy(logits.flatten(0, 1), labels[:, mine].flatten(), reduction="sum") / n_targets
    loss.backward()
    shards = [torch.empty_like(logits) for _ in range(world_size)]
    dist.all_gather(shards, logits.detach())
    return {"logits": rel_err(torch.cat(shards, dim=1), ref_logits),
            "grads": worst_grad_error(reduce_grads(model, average_over=1), ref_grads)}


def replaced_forward_errors(rank, world_size, seed):
    """axolotl's varlen path: create_ring_flash_attention_forward replaced in ring_flash_attn.adapters.hf_adapter
    before substitute_hf_flash_attn, which must use the replacement; then the README order: model loaded first,
    substitution after. A replacement whose functions match no transformers signature is refused."""
    import ring_flash_attn.adapters.hf_adapter as hf_adapter

    original = hf_adapter.create_ring_flash_attention_forward
    calls = []

    def counting_forwards(process_group, heads_k_stride):
        (inner,) = original(process_group, heads_k_stride)

        @functools.wraps(inner)
        def counted(*args, **kwargs):
            calls.append(heads_k_stride)
            return inner(*args, **kwargs)

        return [counted]

    lengths = (10, 15, SEQLEN - 25)
    input_ids, position_ids, labels = make_packed_batch(seed + 1, (lengths,))
    register_exact_eager()
    exact, ring = make_models("mistral", seed, EXACT_EAGER, "ring_attention")  # loaded before substituting
    reference = packed_reference_run(exact, input_ids, labels, (lengths,))
    results = {}
    hf_adapter.create_ring_flash_attention_forward = counting_forwards
    try:
        hf_adapter.substitute_hf_flash_attn(process_group=None, heads_k_stride=2)
        hf_adapter.update_ring_flash_attn_params(
            torch.tensor([0, 10, 25, SEQLEN], dtype=torch.int32), None)
        results["model"] = _packed_model_errors(rank, world_size, ring, reference, input_ids, position_ids, labels,
                                                lengths)
        results["replacement_calls"] = len(calls)
        results["heads_k_stride_seen"] = sorted(set(calls))
        hf_adapter.create_ring_flash_attention_forward = lambda group, stride: [lambda q, k, v: None]
        results["mismatched_replacement"] = outcome_of(lambda: hf_adapter.substitute_hf_flash_attn(None, 1))
    finally:
        hf_adapter.create_ring_flash_attention_forward = original
    return results


def client_flash_forward_errors(rank, world_size, seed):
    """axolotl's batch path: its own _flash_attention_forward (checked with check_params against transformers')
    calls ring_flash_attn_func; flash_attention_forward from the adapter is registered for "flash_attention_2"
    and must reach the client's function through the transformers module at call time."""
    import transformers.modeling_flash_attention_utils as flash_utils
    from transformers import AttentionInterface

    import ring_flash_attn.adapters.hf_adapter as hf_adapter
    from ring_flash_attn import ring_flash_attn_func
    from tests.integrations.hf_workers import reference_run

    installed = flash_utils._flash_attention_forward

    def client_forward(query_states, key_states, value_states, attention_mask, query_length, is_causal, dropout=0.0,
                       position_ids=None, softmax_scale=None, sliding_window=None, use_top_left_mask=False,
                       softcap=None, deterministic=None, **kwargs):
        window = (sliding_window - 1, -1) if sliding_window is not None else (-1, -1)
        return ring_flash_attn_func(query_states, key_states, value_states, dropout_p=dropout,
                                    softmax_scale=softmax_scale, causal=is_causal, window_size=window, group=None)

    client_forward.__signature__ = __import__("inspect").signature(installed)  # as written for this version
    results = {"check_params": hf_adapter.check_params(installed, client_forward),
               "check_params_mismatch": hf_adapter.check_params(installed, lambda a, b: None)}
    exact, flash = make_models("mistral", seed, EXACT_EAGER, "eager")
    flash.config._attn_implementation = "flash_attention_2"  # transformers refuses it at load time on CPU
    input_ids, labels = make_batch(seed + 1)
    ref_logits, _, ref_grads = reference_run(exact, input_ids, labels)
    flash_utils._flash_attention_forward = client_forward
    AttentionInterface.register("flash_attention_2", hf_adapter.flash_attention_forward)
    try:
        piece = SEQLEN // world_size
        mine = slice(rank * piece, (rank + 1) * piece)
        positions = torch.arange(SEQLEN)[mine].expand(input_ids.shape[0], -1)
        logits = flash(input_ids=input_ids[:, mine], position_ids=positions).logits
        loss = F.cross_entropy(logits.flatten(0, 1), labels[:, mine].flatten(), reduction="sum")
        (loss / int((labels != -100).sum())).backward()
        shards = [torch.empty_like(logits) for _ in range(world_size)]
        dist.all_gather(shards, logits.detach())
        results["logits"] = rel_err(torch.cat(shards, dim=1), ref_logits)
        results["grads"] = worst_grad_error(reduce_grads(flash, average_over=1), ref_grads)
    finally:
        flash_utils._flash_attention_forward = installed
    return results


def bert_config():
    import transformers

    return transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=48, max_position_embeddings=2 * SEQLEN, hidden_dropout_prob=0.0,
                                   attention_probs_dropout_prob=0.0, type_vocab_size=1)


def encoder_errors(rank, world_size, seed):
    """A non-causal encoder (BERT) through substitute_hf_flash_attn, dispatching on "flash_attention_2" (as loaded on
    a GPU machine) and on "ring_attention" (how a CPU machine loads it): packed sequences in contiguous pieces, its
    hidden states and gradients against each sequence run alone in float64 eager attention."""
    from transformers import BertModel

    from ring_flash_attn import substitute_hf_flash_attn, update_ring_flash_attn_params

    lengths = (10, 15, SEQLEN - 25)
    register_exact_eager()
    torch.manual_seed(seed)
    exact = BertModel(bert_config(), add_pooling_layer=False).double()
    exact.set_attn_implementation(EXACT_EAGER)
    g = torch.Generator().manual_seed(seed + 1)
    input_ids = torch.randint(1, 64, (1, SEQLEN), generator=g)
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    weights = torch.randn(1, SEQLEN, 32, generator=g, dtype=torch.float64)
    bounds = [0, 10, 25, SEQLEN]
    ref = torch.cat([exact(input_ids=input_ids[:, a:b], position_ids=position_ids[:, a:b]).last_hidden_state
                     for a, b in zip(bounds, bounds[1:])], dim=1)
    (ref * weights).sum().backward()
    ref_grads = {name: p.grad.clone() for name, p in exact.named_parameters() if p.grad is not None}

    substitute_hf_flash_attn(None, heads_k_stride=1)
    update_ring_flash_attn_params(torch.tensor(bounds, dtype=torch.int32), None)
    piece = SEQLEN // world_size
    mine = slice(rank * piece, (rank + 1) * piece)
    results = {}
    for name in ("flash_attention_2", "ring_attention"):
        ring = BertModel(bert_config(), add_pooling_layer=False).double()
        ring.load_state_dict(exact.state_dict())
        ring.config._attn_implementation = name  # flash_attention_2: as loaded with it on a GPU machine
        hidden = ring(input_ids=input_ids[:, mine], position_ids=position_ids[:, mine]).last_hidden_state
        (hidden * weights[:, mine]).sum().backward()
        shards = [torch.empty_like(hidden) for _ in range(world_size)]
        dist.all_gather(shards, hidden.detach())
        grads = reduce_grads(ring, average_over=1)
        want = dict(ref_grads)
        # A key bias shifts every score of a row alike, which softmax ignores: its true gradient is 0, so both
        # sides hold rounding noise there; they are compared in absolute terms.
        flat = [key for key in want if key.endswith("attention.self.key.bias")]
        key_bias = max((grads.pop(key) - want.pop(key)).abs().max().item() for key in flat)
        results[name] = {"hidden": rel_err(torch.cat(shards, dim=1), ref), "grads": worst_grad_error(grads, want),
                         "key_bias_grads_abs": key_bias}
    return results


def loaded_before_registering(rank, world_size, seed):
    """Run first in a fresh rank: a model loaded with "ring_attention" before anything configured the name. Its
    forward says what to call; after register_ring_attention it runs the ring (logits vs one process)."""
    from transformers import AutoModelForCausalLM

    from ring_flash_attn.integrations import hf

    assert "ring_attention" not in hf._SETTINGS, "this check must run before anything registers ring attention"
    torch.manual_seed(seed)
    ring = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="ring_attention",
                                            dtype=torch.float64)
    input_ids, _ = make_batch(seed + 1)
    local = hf.shard_batch(input_ids, variant="ring")
    run = lambda: ring(input_ids=local["input_ids"], position_ids=local["position_ids"]).logits  # noqa: E731
    results = {"before": outcome_of(run)}
    hf.register_ring_attention(variant="ring")
    register_exact_eager()
    exact = copy.deepcopy(ring)
    exact.set_attn_implementation(EXACT_EAGER)
    with torch.no_grad():
        results["logits"] = rel_err(hf.gather_logits(run(), variant="ring"), exact(input_ids=input_ids).logits)
    return results


def switched_off_outcome(rank, world_size, seed):
    """use_ring_attn(False): the substituted transformers function runs transformers' own flash attention (which
    this CPU machine lacks: transformers' error, not ours); True again restores the ring."""
    import transformers.modeling_flash_attention_utils as flash_utils

    import ring_flash_attn.adapters.hf_adapter as hf_adapter

    hf_adapter.substitute_hf_flash_attn(None, heads_k_stride=1)
    q = torch.randn(1, 8, 4, DIM, dtype=torch.float64)
    hf_adapter.use_ring_attn(False)
    try:
        off = outcome_of(lambda: flash_utils._flash_attention_forward(q, q, q, None, 8, True))
    finally:
        hf_adapter.use_ring_attn(True)
    return {"off": off, "switch_after": hf_adapter.RING_ATTN_SWITCH}


def zhuzilin_api_checks(rank, world_size, seed):
    return {"switched_off": switched_off_outcome(rank, world_size, seed),
            "ring_comm": ring_comm_errors(rank, world_size, seed),
            "all_gather_comm": {stride: all_gather_comm_errors(rank, world_size, seed + 1, stride) for stride in (1, 2)},
            "data_params": data_params_errors(rank, world_size, seed + 2),
            "replaced_forward": replaced_forward_errors(rank, world_size, seed + 3),
            "client_flash_forward": client_flash_forward_errors(rank, world_size, seed + 4),
            "encoder": encoder_errors(rank, world_size, seed + 5)}
