"""Model FLOPs per token (attention counted, causal halved) and the peak table behind MFU."""

import torch

from ring_flash_attn.train.config import DataConfig, ModelConfig, RunConfig
from ring_flash_attn.train.flops import flops_per_token, peak_tflops
from ring_flash_attn.train.model import build_model


def test_flops_per_token_by_hand():
    model = build_model(RunConfig(model=ModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                    num_attention_heads=4, num_key_value_heads=2),
                                  data=DataConfig(seq_len=64)), "sdpa")
    hidden, inter, layers, kv_dim, vocab = 32, 64, 2, 2 * 8, 320
    per_layer = hidden * hidden * 2 + hidden * kv_dim * 2 + 3 * hidden * inter  # q, o; k, v; gate, up, down
    products = layers * per_layer + vocab * hidden  # the LM head; the input embedding is a lookup
    attention = 12 * layers * 4 * 8 * 64 / 2  # QK^T and PV, forward and backward, causal: half the context
    assert flops_per_token(model, 64) == 6 * products + attention


def test_peak_from_config_table_or_none():
    assert peak_tflops(torch.device("cpu"), "bf16", None) is None  # no MFU claimed for a CPU
    assert peak_tflops(torch.device("cpu"), "bf16", 123.0) == 123.0
