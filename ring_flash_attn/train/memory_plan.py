"""How much memory a rank needs for a training step, part by part, before anything is allocated.

The plan counts, for one rank: the model states FSDP shards over the ranks (float32 weights, gradients and
AdamW's two moments), the weights it gathers for the layer at hand, the activations (bytes per token of
the rank's share of the sequence: checkpointed layer inputs, the one layer recomputed in the backward, the
loss chunk, the ring's K/V buffers), and decides from them what a run at this length needs:

- activation checkpointing (``train.activation_checkpointing: auto``): off while everything fits, else
  every layer;
- activation offload (``train.offload_activations: null``): on when the checkpointed inputs do not fit;
- state offload (``parallel.cpu_offload: null``): on when the states do not fit beside the activations.

Each automatic choice takes the leaner path only when the step would not fit in ``MEMORY_FRACTION`` of the
device's memory otherwise, so a run that fits anyway keeps its speed. The plan also gives the longest
``data.seq_len`` it predicts to fit (``longest_fitting``). Its per-token figures are counts of the tensors
a transformers decoder layer keeps (written out below), not measurements: ``ring-attn capacity`` measures,
and benchmarks/RESULTS.md holds both side by side.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from . import tiling

MEMORY_FRACTION = 0.85      # of the device's memory a plan may fill (the allocator's fragmentation, the runtime)
HOST_FRACTION = 0.75        # of a rank's share of host memory its offloaded states and activations may fill
RUNTIME_BYTES = 1 << 30     # CUDA/XPU context, library workspaces, communicator buffers: left to the runtime
GIB = 2 ** 30


@dataclass(frozen=True)
class Shape:
    """What the plan needs of a model: its sizes and parameter counts."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    layer_params: int       # parameters of one decoder layer
    root_params: int        # the rest: embeddings, final norm, output projection (once when tied)

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.root_params

    @classmethod
    def of_model(cls, model) -> "Shape":
        """The shape of a transformers causal LM (on any device, ``meta`` included), its parameters counted."""
        from .fsdp import decoder_layers

        shape = cls.of(model.config)
        layers = decoder_layers(model)
        layer_params = sum(p.numel() for p in layers[0].parameters())
        root_params = sum(p.numel() for p in model.parameters()) - len(layers) * layer_params
        return dataclasses.replace(shape, layer_params=layer_params, root_params=root_params)

    @classmethod
    def of(cls, hf_config) -> "Shape":
        """The shape of a model from its transformers config, its parameters counted for a Llama-style layer."""
        hidden, layers = hf_config.hidden_size, hf_config.num_hidden_layers
        heads = hf_config.num_attention_heads
        kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
        head_dim = getattr(hf_config, "head_dim", None) or hidden // heads
        intermediate = hf_config.intermediate_size
        attention = hidden * head_dim * (2 * heads + 2 * kv_heads)          # q, o and k, v projections
        layer_params = attention + 3 * hidden * intermediate + 2 * hidden    # gated MLP, two norms
        tied = getattr(hf_config, "tie_word_embeddings", False)
        root_params = hf_config.vocab_size * hidden * (1 if tied else 2) + hidden
        return cls(hidden, intermediate, layers, heads, kv_heads, head_dim, hf_config.vocab_size, layer_params,
                   root_params)


@dataclass
class Choices:
    activation_checkpointing: str   # none, full or every_n
    offload_activations: bool
    cpu_offload: bool


@dataclass
class Plan:
    """One rank's memory for one step at ``tokens`` tokens (its share of the sequence, all micro-batch rows)."""

    tokens: int
    choices: Choices
    parts: Dict[str, int]           # bytes on the device at the step's peak, by part
    host_parts: Dict[str, int]      # bytes in host memory (offloaded states and activations)
    device_bytes: int               # the device's memory as the plan sees it
    phases: Dict[str, int] = field(default_factory=dict)  # the step's phases; the largest is among the parts
    host_bytes: Optional[int] = None  # this rank's share of host memory (None: not limited)
    notes: List[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def host_total(self) -> int:
        return sum(self.host_parts.values())

    @property
    def fits(self) -> bool:
        host_fits = self.host_bytes is None or self.host_total <= HOST_FRACTION * self.host_bytes
        return self.total <= MEMORY_FRACTION * self.device_bytes and host_fits

    @property
    def dominant(self) -> str:
        return max(self.parts, key=self.parts.get)

    def describe(self) -> List[str]:
        """Lines for the start of a run: the parts, the choices, the total against the device."""
        order = sorted(self.parts.items(), key=lambda item: -item[1])
        lines = [f"memory plan per rank at {self.tokens:,} tokens: {_gib(self.total)} of {_gib(self.device_bytes)} "
                 f"({100 * self.total / self.device_bytes:.0f} %; dominant: {self.dominant})",
                 "  " + ", ".join(f"{name} {_gib(size)}" for name, size in order)]
        if any(self.host_parts.values()):
            share = f" (of {_gib(self.host_bytes)} of host memory per rank)" if self.host_bytes else ""
            lines.append("  in host memory: " + ", ".join(f"{name} {_gib(size)}" for name, size in
                                                           self.host_parts.items() if size) + share)
        c = self.choices
        lines.append(f"  activation checkpointing {c.activation_checkpointing}, activation offload "
                     f"{'on' if c.offload_activations else 'off'}, state offload {'on' if c.cpu_offload else 'off'}")
        lines += ["  " + note for note in self.notes]
        return lines


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2 ** 20:.0f} MiB"


@dataclass(frozen=True)
class Settings:
    """The run's settings the plan depends on (from the config; see ``Settings.of``)."""

    seq_len: int
    micro_batch: int
    cp: int
    shard_ranks: int                # ranks FSDP shards the states over
    compute_bytes: int              # 2 for bf16, 4 for fp32
    loss_chunk_bytes: int
    tile_bytes: int
    activation_checkpointing: str   # auto, none, full, every_n
    checkpoint_every: int
    offload_activations: Optional[bool]
    cpu_offload: Optional[bool]
    accelerator: bool
    host_bytes: Optional[int] = None  # this rank's share of the host's memory, for what is offloaded

    @classmethod
    def of(cls, config, world_size: int, accelerator: bool, device_bytes: int,
           host_bytes: Optional[int] = None) -> "Settings":
        train, parallel = config.train, config.parallel
        return cls(config.data.seq_len, train.micro_batch_size, parallel.cp, world_size // parallel.fsdp_replicate,
                   2 if train.precision == "bf16" else 4, int(loss_chunk_mib(config, device_bytes) * 2 ** 20),
                   int(train.tile_mib * 2 ** 20), train.activation_checkpointing,
                   train.activation_checkpointing_n, train.offload_activations, parallel.cpu_offload, accelerator,
                   host_bytes)

    @property
    def tokens(self) -> int:
        return self.seq_len // self.cp * self.micro_batch


# What a transformers decoder layer (RMSNorms, rotary attention, gated MLP: Llama's) keeps for its backward,
# per token, with a = the compute dtype's size, in two groups: what its attention's backward still needs when it
# runs, and what the part after attention needs (freed by then: the backward runs the layer in reverse).
# - the input norm's output (a h) for q, k, v; q, k, v after rotary, the output (a d (2 heads + 2 kv_heads)),
#   the float32 log-sum-exp per head;
# - after attention: the output's contiguous copy for o_proj (a d heads), the residual and the second norm's
#   output (2 a h) or, untiled, that norm's float32 input and normalised value too (4 h + a h), the input norm's
#   the same way; the gated MLP's gate and up projections, activation and product (4 m a), or one tile's worth.
def _layer_saved(shape: Shape, s: Settings, tokens: int) -> Tuple[int, int]:
    """(bytes the attention's backward needs, bytes the rest of the layer's backward needs)."""
    a, h, m, d = s.compute_bytes, shape.hidden, shape.intermediate, shape.head_dim
    norm_tile, mlp_tile = _tile_tokens(s, tiling.norm_bytes_per_token(h, a)), _tile_tokens(s, 4 * m * a)
    untiled_norm = (4 * h + a * h) if tokens <= norm_tile else 0   # float32 input and normalised value
    attention = a * h + untiled_norm + a * d * (2 * shape.heads + 2 * shape.kv_heads) + 4 * shape.heads
    after = a * d * shape.heads + 2 * a * h + untiled_norm
    return attention * tokens, after * tokens + 4 * m * a * min(tokens, mlp_tile)


def _backward_gradients(shape: Shape, s: Settings, tokens: int) -> int:
    """Gradients alive at a layer's attention backward: the gradient along the residual and into the attention's
    output, dq, dk, dv, and the attention kernel's float32 accumulator of dq."""
    a, d = s.compute_bytes, shape.head_dim
    return tokens * (2 * a * shape.hidden + a * d * (shape.heads + 2 * shape.kv_heads) + 4 * shape.heads * d)


def _tile_tokens(s: Settings, bytes_per_token: int) -> float:
    return tiling.tile_tokens(bytes_per_token, s.tile_bytes) if s.tile_bytes > 0 else float("inf")


def plan_step(shape: Shape, s: Settings, device_bytes: int, tokens: Optional[int] = None,
              choices: Optional[Choices] = None) -> Plan:
    """The memory of one step; with ``choices`` None, the automatic choices made as the module docstring says.

    The total is what lives through the step (states, gathered weights, saved activations) plus the largest
    of its phases: the loss, and a layer's backward (the layer recomputed, its gradients).
    """
    tokens = s.tokens if tokens is None else tokens
    if choices is None:
        return _choose(shape, s, device_bytes, tokens)
    a, h = s.compute_bytes, shape.hidden
    parts: Dict[str, int] = {}
    host: Dict[str, int] = {}
    # States: float32 weights, gradients and AdamW's two moments, sharded; the weights gathered for the layer at
    # hand and the next (FSDP prefetches), with their gradients in the backward, and the root's (embeddings,
    # output projection) for the whole step, with the loss's float32 sum of the projection's gradient.
    states = 16 * shape.params // s.shard_ranks
    if choices.cpu_offload:
        host["states"] = states
    else:
        parts["states (sharded weights, grads, AdamW)"] = states
    parts["gathered weights"] = 2 * shape.layer_params * a + shape.layer_params * (a + 4) + shape.root_params * (2 * a + 4)
    attention, after = _layer_saved(shape, s, tokens)
    gradients = _backward_gradients(shape, s, tokens)
    mode = choices.activation_checkpointing
    if mode == "none":
        parts["activations (every layer)"] = shape.layers * (attention + after)
        layer_backward = gradients
    else:
        every = 1 if mode == "full" else s.checkpoint_every
        checkpointed = -(-shape.layers // every)
        inputs = checkpointed * tokens * h * a
        if choices.offload_activations:
            host["checkpointed layer inputs"] = inputs
            inputs = 2 * tokens * h * a   # the input in use and the one fetched ahead
        parts["checkpointed layer inputs"] = inputs
        if checkpointed < shape.layers:
            parts["activations (layers not checkpointed)"] = (shape.layers - checkpointed) * (attention + after)
        # Recomputed, the layer holds all it saved, then frees the rest as its attention's backward begins.
        layer_backward = max(attention + after + tokens * a * h, attention + gradients)
    if s.cp > 1:  # two K/V blocks in flight (forward) and two dK/dV blocks (backward), double-buffered
        parts["ring buffers"] = 4 * 2 * tokens * shape.kv_heads * shape.head_dim * a
    parts["runtime"] = RUNTIME_BYTES if s.accelerator else 0
    # The loss: the final norm's saved tensors, the last hidden states and their gradient, one chunk of logits.
    final_norm = 2 * a * h + (4 * h + a * h if tokens <= _tile_tokens(s, tiling.norm_bytes_per_token(h, a)) else 0)
    loss = tokens * (final_norm + a * h) + min(s.loss_chunk_bytes, tokens * shape.vocab * (2 * a + 8))
    phases = {"layer backward (recomputed layer, gradients)": layer_backward, "loss": loss}
    phase = max(phases, key=phases.get)
    parts[phase] = phases[phase]
    return Plan(tokens, choices, parts, host, device_bytes, phases=phases, host_bytes=s.host_bytes)


# From the fastest to the leanest: recomputing layers costs a third more compute, moving their inputs to the
# host costs copies that overlap compute, and keeping the states there moves weights and gradients every step
# and runs the optimizer on the host.
CANDIDATES = [Choices("none", False, False), Choices("full", False, False), Choices("full", True, False),
              Choices("full", False, True), Choices("full", True, True)]


def _choose(shape: Shape, s: Settings, device_bytes: int, tokens: int) -> Plan:
    """The first of ``CANDIDATES`` that fits and agrees with what the config forces."""
    forced = Choices(None if s.activation_checkpointing == "auto" else s.activation_checkpointing,
                     s.offload_activations if s.accelerator else False, s.cpu_offload if s.accelerator else False)
    candidates = []
    for candidate in CANDIDATES:
        chosen = Choices(*(mine if mine is not None else theirs
                           for mine, theirs in zip(dataclasses.astuple(forced), dataclasses.astuple(candidate))))
        if chosen.activation_checkpointing == "none":
            chosen.offload_activations = False  # only checkpointed layers' inputs are offloaded
        if chosen not in candidates:
            candidates.append(chosen)
    plans = [plan_step(shape, s, device_bytes, tokens, c) for c in candidates]
    for plan in plans:
        if plan.fits:
            return plan
    # Host memory is the weaker limit (some machines report less than they give): a plan that fits the device
    # and only overflows the host's share goes ahead, with a warning.
    for plan in plans:
        if plan.total <= MEMORY_FRACTION * device_bytes:
            plan.notes.append(f"warning: {_gib(plan.host_total)} offloaded to host memory, more than "
                              f"{HOST_FRACTION:.0%} of this rank's {_gib(s.host_bytes)} share of it")
            return plan
    leanest = min(plans, key=lambda p: p.total)
    leanest.notes.append(f"does not fit: {_gib(leanest.total)} > {MEMORY_FRACTION:.0%} of {_gib(device_bytes)}; "
                         f"dominant part: {leanest.dominant}")
    return leanest


def longest_fitting(shape: Shape, s: Settings, device_bytes: int, multiple: int = 1) -> int:
    """The longest ``data.seq_len`` (a multiple of ``multiple``) whose automatic plan fits; 0 if none does."""
    def fits(seq_len: int) -> bool:
        trial = dataclasses.replace(s, seq_len=seq_len)
        return plan_step(shape, trial, device_bytes).fits

    unit = max(multiple, s.cp)
    if not fits(unit):
        return 0
    low, high = unit, 2 * unit
    while fits(high):
        low, high = high, 2 * high
        if high > 1 << 40:
            return low
    while high - low > unit:
        middle = (low + high) // 2 // unit * unit
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def local_ranks(world_size: int) -> int:
    """Ranks on this host, from the launcher's environment; without it, all of them (the cautious guess)."""
    for name in ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "PALS_LOCAL_SIZE"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return world_size


def host_memory(local_ranks: int = 1) -> int:
    """This rank's share of the host's RAM."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(1, local_ranks)


def device_memory(device: torch.device, local_ranks: int = 1) -> int:
    """Bytes of memory of ``device``: an accelerator's own, or the host's RAM shared by ``local_ranks`` processes."""
    if device.type == "cpu":
        return host_memory(local_ranks)
    module = getattr(torch, device.type)
    return int(module.get_device_properties(device).total_memory)


LOSS_CHUNK_SHARE = 64         # an automatic loss chunk takes this share of the device's memory ...
LOSS_CHUNK_MAX_MIB = 1024     # ... and at most this: larger chunks are no faster


def loss_chunk_mib(config, device_bytes: int) -> float:
    """``train.loss_chunk_mib``, or its automatic value for a device of ``device_bytes``."""
    if config.train.loss_chunk_mib is not None:
        return config.train.loss_chunk_mib
    return min(LOSS_CHUNK_MAX_MIB, device_bytes / LOSS_CHUNK_SHARE / 2 ** 20)


def check_device_choices(config, device_type: str) -> None:
    """Switches the device cannot serve are config errors (raised alike on every rank, before any collective)."""
    from .config import ConfigError

    if device_type != "cpu":
        return
    if config.train.offload_activations:
        raise ConfigError("config key train.offload_activations: true needs a GPU (CUDA or XPU): on the CPU the "
                          "activations are in host memory already; set it to null or false")
    if config.parallel.cpu_offload:
        raise ConfigError("config key parallel.cpu_offload: true needs a GPU (CUDA or XPU): on the CPU the states "
                          "are in host memory already; set it to null or false")


def resolve(config, plan: Plan):
    """``config`` with its automatic memory choices replaced by the plan's."""
    choices = plan.choices
    train = dataclasses.replace(config.train, activation_checkpointing=choices.activation_checkpointing,
                                offload_activations=choices.offload_activations,
                                loss_chunk_mib=loss_chunk_mib(config, plan.device_bytes))
    parallel = dataclasses.replace(config.parallel, cpu_offload=choices.cpu_offload)
    return dataclasses.replace(config, train=train, parallel=parallel)
