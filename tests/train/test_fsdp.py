"""FSDP2 over the data x context ranks (4 CPU ranks, gloo): losses and gradients equal one process with full
attention and the plain loss over the model's logits (the sharded runs chunk the loss and tile MLPs and norms);
activation checkpointing changes nothing; parameter and optimizer bytes per rank fall as 1 / N;
a sharded checkpoint resumes on another world size."""

import pytest
import torch

from ring_flash_attn.train import trainer
from ring_flash_attn.train.config import load_config
from ring_flash_attn.train.data import BatchPlan, PackedDataset
from ring_flash_attn.train.metrics import read_metrics
from tests.distributed.harness import run_world
from tests.tolerances import GRADIENT, rel_err

from . import fsdp_workers
from .fsdp_workers import STEPS
from .helpers import plain_loss_and_modules, write_config

# Loss is a mean over every token; over a few AdamW steps float32 runs summing in different orders agree to
# a few ulps of the accumulated error (the --check tolerance).
LOSS_RTOL = 1e-5
# Gradients after the first step differ by Adam's amplification of float32 rounding in the updates.
LATER_GRADIENT_RTOL = 1e-3


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("fsdp")
    config = write_config(base)
    return base, config, run_world(4, fsdp_workers.all_scenarios, config, base, timeout_s=240)[0]


def _reference(config_path, dp_size, *overrides):
    config = load_config(str(config_path), list(overrides))
    dataset = PackedDataset.from_config(config.data)
    plan = BatchPlan(dp_size, config.train.micro_batch_size, config.train.grad_accum)
    steps = []
    with plain_loss_and_modules():
        for loss, model in trainer.reference_steps(config, dataset, plan, STEPS, torch.device("cpu")):
            steps.append((loss, {name: p.grad.clone() for name, p in model.named_parameters()}))
    return steps


@pytest.mark.parametrize("scenario, dp_size", [("dp2_cp2", 2), ("cp4", 1), ("hybrid", 2), ("ulysses2_ring2", 1)])
def test_losses_and_gradients_equal_one_process(world, scenario, dp_size):
    _, config, results = world
    sharded = results[scenario]
    for step, (loss, gradients) in enumerate(_reference(config, dp_size)):
        assert sharded["losses"][step] == pytest.approx(loss, rel=LOSS_RTOL), (scenario, step)
        assert sharded["gradients"][step].keys() == gradients.keys()
        tolerance = GRADIENT[torch.float32] if step == 0 else LATER_GRADIENT_RTOL
        for name, reference in gradients.items():
            error = rel_err(torch.from_numpy(sharded["gradients"][step][name]), reference)
            assert error <= tolerance, (scenario, step, name, error)


@pytest.mark.parametrize("scenario", ["cp4_checkpointed", "cp4_every_2nd"])
def test_activation_checkpointing_changes_nothing(world, scenario):
    _, _, results = world
    plain, checkpointed = results["cp4"], results[scenario]
    assert checkpointed["losses"] == plain["losses"]
    for step in range(STEPS):
        for name, gradient in plain["gradients"][step].items():
            assert (checkpointed["gradients"][step][name] == gradient).all(), (scenario, step, name)


def test_ulysses_x_ring_matches_ring_only(world):
    """parallel.ulysses 2 x ring 2 against cp 4 on the ring alone: the same losses, the same gradients."""
    _, _, results = world
    ring, usp = results["cp4"], results["ulysses2_ring2"]
    assert usp["losses"] == pytest.approx(ring["losses"], rel=LOSS_RTOL)
    for step in range(STEPS):
        tolerance = GRADIENT[torch.float32] if step == 0 else LATER_GRADIENT_RTOL
        for name, gradient in ring["gradients"][step].items():
            error = rel_err(torch.from_numpy(usp["gradients"][step][name]), torch.from_numpy(gradient))
            assert error <= tolerance, (step, name, error)


def test_state_bytes_per_rank_fall_as_one_over_ranks(world):
    _, config, results = world
    model = trainer.full_model(load_config(str(config)), "sdpa")
    # AdamW keeps two moments per parameter, as large as it.
    full_bytes = 3 * sum(p.numel() * p.element_size() for p in model.parameters())
    per_rank = results["dp2_cp2"]["state_bytes"]
    # Each rank holds a quarter, plus the padding FSDP adds to make dim 0 divisible by 4 and Adam's step counters.
    assert full_bytes / 4 <= per_rank <= 1.05 * full_bytes / 4


@pytest.fixture(scope="module")
def two_ranks(world):
    """The 4-rank run's losses (read before the resume rewrites its log), and the 2-rank world's results."""
    base, config, _ = world
    straight = [r["loss"] for r in read_metrics(base / "resize" / "metrics.jsonl")]
    return straight, run_world(2, fsdp_workers.two_rank_scenarios, config, base, timeout_s=180)[0]


def test_resume_on_another_world_size_continues(two_ranks):
    straight, results = two_ranks
    assert len(straight) == 6 and len(results["resumed"]) == 3
    assert results["resumed"] == pytest.approx(straight[3:], rel=LOSS_RTOL)


def test_compiled_layers_equal_eager_and_compile_once(two_ranks):
    _, results = two_ranks
    eager, compiled = results["eager"], results["compiled"]
    assert compiled["losses"] == pytest.approx(eager["losses"], rel=LOSS_RTOL)
    for step in range(STEPS):
        for name, gradient in eager["gradients"][step].items():
            error = rel_err(torch.from_numpy(compiled["gradients"][step][name]), torch.from_numpy(gradient))
            assert error <= GRADIENT[torch.float32], (step, name, error)
    graphs = compiled["graphs_compiled"]
    assert graphs[0] > eager["graphs_compiled"][-1]  # it did compile
    assert graphs[1] == graphs[2], "recompiled after the first steps"


def test_tied_embeddings_on_two_ranks_equal_one_process(world, two_ranks):
    """The chunked loss's projection gradient and the embedding's gradient land in one tied weight."""
    _, config, _ = world
    _, results = two_ranks
    tied = results["tied"]
    assert any("embed_tokens" in name for name in tied["gradients"][0])
    assert not any("lm_head" in name for name in tied["gradients"][0])
    for step, (loss, gradients) in enumerate(_reference(config, 1, fsdp_workers.TIED)):
        assert tied["losses"][step] == pytest.approx(loss, rel=LOSS_RTOL), step
        tolerance = GRADIENT[torch.float32] if step == 0 else LATER_GRADIENT_RTOL
        for name, reference in gradients.items():
            error = rel_err(torch.from_numpy(tied["gradients"][step][name]), reference)
            assert error <= tolerance, (step, name, error)


def test_state_bytes_halve_from_two_ranks_to_four(world, two_ranks):
    _, _, four = world
    _, two = two_ranks
    ratio = two["eager"]["state_bytes"] / four["dp2_cp2"]["state_bytes"]
    assert 1.9 <= ratio <= 2.05, ratio  # 1 / N, up to FSDP's padding of dim 0
