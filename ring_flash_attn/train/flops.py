"""Model FLOPs per step and MFU (model FLOPs utilisation), as torchtitan and the PaLM paper count them.

Per token, training costs 6 FLOPs per weight of every matrix product (2 in
the forward, 4 in the backward); the input embedding is a lookup, not a
product, so it is left out. Attention adds its two products per layer, QK^T
and PV, each 2 x context x (heads x head_dim) FLOPs per token in the forward
and twice that in the backward: 12 x layers x heads x head_dim x context per
token, halved for causal attention (a token sees half the sequence on
average). With document masking the count still takes the whole sequence as
the context, so it is an upper bound there.

MFU is achieved model FLOP/s per device over the device's peak dense FLOP/s
for the run's precision: from ``log.peak_tflops``, or from the table below
(vendors' dense figures, no sparsity); unknown devices (and CPUs) report none.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

# (substring of the device name, precision) -> peak dense TFLOP/s of one device as PyTorch sees it.
PEAK_TFLOPS = {
    ("H200", "bf16"): 989.0, ("H200", "fp32"): 67.0,
    ("H100 PCIe", "bf16"): 756.0, ("H100 PCIe", "fp32"): 51.0,
    ("H100", "bf16"): 989.0, ("H100", "fp32"): 67.0,
    ("A100", "bf16"): 312.0, ("A100", "fp32"): 19.5,
    ("MI300X", "bf16"): 1307.0, ("MI300X", "fp32"): 163.4,
    # One tile of a Data Center GPU Max 1550 (a tile is one device under ZE_FLAT_DEVICE_HIERARCHY=FLAT).
    ("Max 1550", "bf16"): 419.0, ("Max 1550", "fp32"): 26.0,
}


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token of ``model`` (a transformers causal LM) at ``seq_len``, causal attention."""
    config = model.config
    embedding = model.get_input_embeddings().weight
    tied = getattr(config, "tie_word_embeddings", False)
    products = sum(p.numel() for p in model.parameters() if p.dim() >= 2) - (0 if tied else embedding.numel())
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * head_dim * seq_len / 2
    return 6 * products + attention


def device_name(device: torch.device) -> str:
    if device.type == "cpu":
        return "cpu"
    return getattr(torch, device.type).get_device_name(device)


def peak_tflops(device: torch.device, precision: str, configured: Optional[float]) -> Optional[float]:
    if configured is not None:
        return configured
    name = device_name(device)
    for (fragment, table_precision), peak in PEAK_TFLOPS.items():
        if fragment in name and table_precision == precision:
            return peak
    return None
