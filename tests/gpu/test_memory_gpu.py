"""The memory-lean training step on a CUDA device (run on the device machine): the chunked loss's mixed-dtype
accumulation, activation offload (bitwise the same gradients, less device memory between forward and backward),
and a training run with both offloads against one without."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ring_flash_attn.train import offload
from ring_flash_attn.train.activation_checkpoint import checkpoint_wrapper, is_checkpointed
from ring_flash_attn.train.fsdp import decoder_layers
from ring_flash_attn.train import loss as loss_module
from ring_flash_attn.train.loss import _add_product, linear_cross_entropy_sum
from tests.tolerances import rel_err

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")]
REPO = Path(__file__).resolve().parents[2]


def test_bf16_products_accumulate_in_float32_in_place():
    g = torch.Generator(device="cuda").manual_seed(int(torch.randint(0, 2 ** 31 - 1, ()).item()))
    a = [torch.randn(512, 300, device="cuda", generator=g).bfloat16() for _ in range(4)]
    b = [torch.randn(300, 256, device="cuda", generator=g).bfloat16() for _ in range(4)]
    total = torch.zeros(512, 256, device="cuda")
    address = total.data_ptr()
    for x, y in zip(a, b):
        _add_product(total, x, y)
    expected = sum(x.double() @ y.double() for x, y in zip(a, b))
    assert total.data_ptr() == address and total.dtype == torch.float32
    assert "cuda" in loss_module._MIXED_PRODUCT_DEVICES, "torch.addmm(out_dtype=float32) was refused: fell back"
    assert rel_err(total, expected) <= 1e-5  # float32 sums of exact bf16 products


def test_chunked_loss_in_bf16_on_the_gpu_is_the_plain_loss():
    hidden = torch.randn(3000, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(5003, 256, device="cuda") / 16).bfloat16().requires_grad_()
    labels = torch.randint(0, 5003, (3000,), device="cuda")
    labels[::7] = -100
    loss = linear_cross_entropy_sum(hidden, weight, labels, budget_bytes=400 * 5003 * 12)
    loss.backward()
    ours = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    plain = F.cross_entropy(F.linear(hidden, weight).float(), labels, reduction="sum")
    plain.backward()
    assert rel_err(loss, plain) <= 1e-5
    assert rel_err(ours[0], hidden.grad) <= 1e-2 and rel_err(ours[1], weight.grad) <= 1e-2


def _model(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).cuda().bfloat16()
    for index, layer in enumerate(decoder_layers(model)):
        decoder_layers(model)[index] = checkpoint_wrapper(layer, preserve_rng_state=False)
    return model


def test_activation_offload_gives_the_same_gradients_in_less_device_memory():
    layers, tokens = 6, 8192
    inputs = torch.randint(0, 512, (1, tokens), device="cuda")
    results = []
    for offloaded in (False, True):
        model = _model(layers)
        if offloaded:
            mover = offload.apply_activation_offload(model, torch.device("cuda"), is_checkpointed)
        loss = model(input_ids=inputs).logits.float().square().mean()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        between = torch.cuda.memory_allocated()
        loss.backward()
        results.append((between, {n: p.grad.clone() for n, p in model.named_parameters()}))
        del model, loss
    (plain_bytes, plain), (offloaded_bytes, moved) = results
    for name, gradient in plain.items():
        assert torch.equal(moved[name], gradient), name
    inputs_bytes = layers * tokens * 256 * 2
    assert mover.moved_bytes == inputs_bytes
    assert plain_bytes - offloaded_bytes >= 0.9 * inputs_bytes, (plain_bytes, offloaded_bytes)


def _train(tmp: Path, name: str, *overrides) -> list:
    config = tmp / "tiny.yaml"
    config.write_text(json.dumps({
        "model": {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
                  "num_key_value_heads": 2},
        "data": {"seq_len": 8192, "max_bytes": 2_000_000},
        "train": {"steps": 3, "warmup_steps": 1, "precision": "bf16", "activation_checkpointing": "full"},
        "parallel": {"cp": 1, "device": "cuda"}, "checkpoint": {"save": False},
        "log": {"plot": False, "progress": "lines"}}))
    log = tmp / name
    done = subprocess.run([sys.executable, "-m", "ring_flash_attn", "train", "--config", str(config),
                           "--log.dir", str(log), *overrides], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line)["loss"] for line in (log / "metrics.jsonl").read_text().splitlines()]


def test_training_with_both_offloads_matches_training_without(tmp_path):
    plain = _train(tmp_path, "plain", "--train.offload_activations", "false", "--parallel.cpu_offload", "false")
    offloaded = _train(tmp_path, "offloaded", "--train.offload_activations", "true", "--parallel.cpu_offload", "true")
    # the same step on the device; AdamW on the host (float32 either way) sums in another order
    assert offloaded == pytest.approx(plain, rel=1e-4)
