"""Real models on 2 CPU ranks (gloo): a pretrained transformers directory saved by the test is loaded into the
sharded model (each rank its shards, from rank 0) and trains as one process would, with a Llama 3 rope
extension to twice its positions."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ring_flash_attn.train.config import load_config
from ring_flash_attn.train.data import BatchPlan, PackedDataset
from ring_flash_attn.train import trainer
from tests.distributed.harness import run_world
from tests.tolerances import FORWARD, GRADIENT, rel_err

from . import real_model_workers
from .fsdp_workers import STEPS
from .helpers import plain_loss_and_modules, save_tiny_llama, save_tiny_tokenizer, write_config

LOSS_RTOL = 1e-5
LATER_GRADIENT_RTOL = 1e-3
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 2.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("real_models")
    tiny = save_tiny_llama(base / "tiny_llama")
    save_tiny_llama(base / "tiny_llama_256", max_position_embeddings=256)  # for configs/cpu_pretrained_documents
    config = write_config(base, data={"seq_len": 128, "max_bytes": 200_000})
    pretrained = [("model.pretrained", str(tiny)), ("model.rope_scaling", json.dumps(LLAMA3_ROPE))]
    tokenizer = save_tiny_tokenizer(base / "tokenizer")
    tokenized = [("data.tokenizer", str(tokenizer)), ("data.cache_dir", str(base / "token_cache")),
                 ("data.max_bytes", "60000"), ("train.steps", "3"), ("checkpoint.every", "0")]
    documents = [("data.document_mask", "true"), ("data.source", "files"), ("data.format", "jsonl"),
                 ("data.path", str(_short_documents(base / "documents.jsonl"))), ("data.seq_len", "64"),
                 ("train.micro_batch_size", "2")]
    results = run_world(2, real_model_workers.all_scenarios, config, base, pretrained, tokenized, documents,
                        timeout_s=180)
    return base, tiny, config, pretrained, results[0], results, documents


def _short_documents(path):
    """Documents of 3 to 40 bytes: a 64-token sequence holds several, and they cross the ranks' pieces."""
    generator = torch.Generator().manual_seed(3)
    lengths = torch.randint(3, 41, (400,), generator=generator).tolist()
    path.write_text("".join(json.dumps({"text": "".join(chr(97 + (i + j) % 26) for j in range(n))}) + "\n"
                            for i, n in enumerate(lengths)))
    return path


def test_pretrained_weights_reach_the_sharded_model_unchanged(world):
    _, tiny, _, _, results, _, _ = world
    saved = load_file(str(tiny / "model.safetensors"))
    loaded = results["pretrained_weights"]
    assert loaded.keys() == saved.keys()
    for name, tensor in saved.items():
        assert torch.equal(torch.from_numpy(loaded[name]), tensor), name


def test_pretrained_with_extended_rope_trains_as_one_process(world):
    _, _, config_path, pretrained, results, _, _ = world
    config = load_config(str(config_path), pretrained)
    dataset = PackedDataset.from_config(config.data)
    plan = BatchPlan(1, config.train.micro_batch_size, config.train.grad_accum)
    with plain_loss_and_modules():  # the gradients are read at each step, inside
        for step, (loss, model) in enumerate(trainer.reference_steps(config, dataset, plan, STEPS,
                                                                     torch.device("cpu"))):
            assert results["pretrained"]["losses"][step] == pytest.approx(loss, rel=LOSS_RTOL), step
            tolerance = GRADIENT[torch.float32] if step == 0 else LATER_GRADIENT_RTOL
            for name, p in model.named_parameters():
                error = rel_err(torch.from_numpy(results["pretrained"]["gradients"][step][name]), p.grad)
                assert error <= tolerance, (step, name, error)
    assert model.config.max_position_embeddings == 128 and model.config.rope_parameters["rope_type"] == "llama3"


def test_tokenized_once_by_rank0_and_reused(world):
    base, _, _, _, results, _, _ = world
    first, again = results["tokenized"]["runs"]
    assert "tokenizing the corpus into" in first["printed"] and "tokenizing" not in again["printed"]
    assert again["losses"] == first["losses"] and len(first["losses"]) == 3
    assert len(list((base / "token_cache").glob("*.tokens"))) == 1
    assert not list((base / "token_cache").glob("*.tmp*"))


def test_corrupt_token_cache_fails_every_rank_alike(world):
    _, _, _, _, _, every_rank, _ = world
    messages = {r["tokenized"]["corrupt"] for r in every_rank}
    assert len(messages) == 1
    message = messages.pop()
    assert "does not match its CRC32" in message and "(corrupt); delete both files to rebuild it" in message


def test_document_mask_equals_full_attention_per_document(world):
    """The oracle runs each document alone through the unsharded model: no packing, no mask, no ring."""
    _, _, config_path, _, results, _, documents = world
    config = load_config(str(config_path), documents)
    dataset = PackedDataset.from_config(config.data)
    plan = BatchPlan(1, config.train.micro_batch_size, config.train.grad_accum)
    model = trainer.full_model(config, "sdpa")
    batch = dataset.batch(plan.global_indices(0, 0), document_mask=True)
    targets, loss_sum, documents_seen = batch.num_targets, 0.0, 0
    for row in range(batch.input_ids.shape[0]):
        starts = torch.nonzero(batch.position_ids[row] == 0).flatten().tolist() + [batch.input_ids.shape[1]]
        for start, end in zip(starts, starts[1:]):
            logits = model(input_ids=batch.input_ids[row:row + 1, start:end]).logits
            loss = torch.nn.functional.cross_entropy(logits[0].float(), batch.labels[row, start:end],
                                                     reduction="sum")
            (loss / targets).backward()
            loss_sum += loss.item()
            documents_seen += 1
    assert documents_seen >= 6  # several documents per sequence, some crossing the two ranks' pieces
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)  # as the trainer's step does
    sharded = results["documents"]
    assert sharded["losses"][0] == pytest.approx(loss_sum / targets, rel=LOSS_RTOL)
    for name, p in model.named_parameters():
        error = rel_err(torch.from_numpy(sharded["gradients"][0][name]), p.grad)
        assert error <= GRADIENT[torch.float32], (name, error)
    # Later steps against the unsharded model on the packed rows (transformers masks by the restarting positions).
    with plain_loss_and_modules():
        reference = [loss for loss, _ in trainer.reference_steps(config, dataset, plan, STEPS, torch.device("cpu"))]
    assert sharded["losses"] == pytest.approx(reference, rel=LOSS_RTOL)


def test_export_loads_with_from_pretrained_and_gives_the_trained_logits(world, tmp_path):
    base, _, _, _, results, _, _ = world
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ring_flash_attn.cli import main

    out = tmp_path / "hf_model"
    assert main(["export", "--checkpoint", str(base / "export_run" / "checkpoints"), "--out", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tokenizer.eos_token == "<eos>" and len(tokenizer) <= model.config.vocab_size
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(results["export"]["input_ids"])).logits
    assert rel_err(logits, torch.from_numpy(results["export"]["logits"])) <= FORWARD[torch.float32]
    # Nothing is overwritten.
    assert main(["export", "--checkpoint", str(base / "export_run" / "checkpoints"), "--out", str(out)]) == 2


def test_document_mask_path_prints_no_future_warnings(world):
    """torch 2.13 deprecated the all-gather exchange's tensor collectives under their old names (a FutureWarning
    from every rank at the first step)."""
    _, _, _, _, _, every_rank, _ = world
    assert [r["document_warnings"] for r in every_rank] == [[], []]


def test_a_step_without_targets_is_skipped_before_it_changes_anything(world):
    _, _, _, _, results, every_rank, _ = world
    for result in every_rank:
        assert result["no_targets"]["skipped"].skipped == trainer.SKIPPED_NO_TARGETS
        assert result["no_targets"]["after"].skipped is None
        assert result["no_targets"]["after"].loss == pytest.approx(result["no_targets"]["after"].loss)  # finite
    assert results["no_targets"]["unchanged"] is True


def test_resume_needs_only_the_checkpoint(world):
    """The pretrained directory moved away after the run started: --resume builds the model from the
    checkpoint's config, loads no pretrained weights, and continues as the uninterrupted run did."""
    _, _, _, _, results, _, _ = world
    moved = results["moved_model"]
    assert [step for step, _ in moved["straight"]] == [1, 2, 3, 4]
    assert moved["resumed"] == moved["straight"]  # steps 3-4 recomputed from the step-2 checkpoint, bit for bit
    assert "step_00000002 (step 2)" in moved["printed"]
    assert "Loading weights" not in moved["printed"] and "resume:" not in moved["printed"]


def test_resume_says_when_it_changes_the_schedule_or_the_batch(world):
    _, _, _, _, results, _, _ = world
    extended = results["moved_model"]["extended"]
    assert "resume: train.steps 4 -> 6: the learning-rate schedule changes from step 5 on (lr " in extended
    assert ("resume: the global batch changes from 1 sequences per step (dp 1 x micro_batch_size 1 x grad_accum 1) "
            "to 2 (dp 1 x micro_batch_size 1 x grad_accum 2); --train.grad_accum 1 keeps it") in extended
    assert "resume: data.seed 0 -> 5: the sequences come in another order from here on" in extended
    assert extended.count("resume:") == 3
    assert results["moved_model"]["extended_steps"] == [1, 2, 3, 4, 5, 6]


def test_a_token_cache_of_another_tokenizer_fails_every_rank_at_start(world):
    _, _, _, _, _, every_rank, _ = world
    messages = {r["tokenized"]["other_tokenizer"] for r in every_rank}
    assert len(messages) == 1, messages
    message = messages.pop()
    assert "holds token ids up to 400, beyond the 320 rows of the model's embedding (it was built with tokenizer " \
           "'/another/tokenizer')" in message, message


def test_a_failed_export_leaves_nothing_and_the_retry_works(world, tmp_path, monkeypatch, capsys):
    """An export that fails midway (here: the disk fills while the weights are written) leaves no half-written
    --out behind; the same command then succeeds."""
    base, _, _, _, _, _, _ = world
    from transformers import PreTrainedModel

    from ring_flash_attn.cli import main

    real_save = PreTrainedModel.save_pretrained

    def disk_full(self, directory, *args, **kwargs):
        (Path(directory) / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    out = tmp_path / "hf_model"
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", disk_full)
    assert main(["export", "--checkpoint", str(base / "export_run" / "checkpoints"), "--out", str(out)]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", real_save)
    assert main(["export", "--checkpoint", str(base / "export_run" / "checkpoints"), "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()


def test_export_of_a_run_directory_suggests_its_checkpoints(world, capsys):
    base, _, _, _, _, _, _ = world
    from ring_flash_attn.cli import main

    assert main(["export", "--checkpoint", str(base / "export_run"), "--out", str(base / "never")]) == 2
    assert f"(it looks like a run directory: did you mean --checkpoint {base / 'export_run' / 'checkpoints'}?)" \
        in capsys.readouterr().err


def test_the_shipped_pretrained_document_mask_example_trains(world):
    _, _, _, _, results, every_rank, _ = world
    losses = results["shipped_example"]["losses"]
    assert len(losses) == 2 and all(0 < loss < 10 for loss in losses), losses
    assert every_rank[1]["shipped_example"]["losses"] == losses


def test_export_when_the_run_s_tokenizer_has_moved(world, tmp_path, capsys):
    """The run's data.tokenizer is gone: the export says so before writing anything; --tokenizer gives its
    new place."""
    base, _, _, _, _, _, _ = world
    from ring_flash_attn.cli import main
    from ring_flash_attn.train import checkpoint as ckpt
    from ring_flash_attn.train.files import file_crc32

    source = sorted((base / "export_run" / "checkpoints").glob("step_*"))[-1]
    copy = tmp_path / "checkpoints" / source.name
    shutil.copytree(source, copy)
    run_config = json.loads((copy / ckpt.RUN_CONFIG).read_text())
    run_config["data"]["tokenizer"] = str(tmp_path / "moved_tokenizer")
    (copy / ckpt.RUN_CONFIG).write_text(json.dumps(run_config))
    manifest = json.loads((copy / ckpt.MANIFEST).read_text())
    manifest["files"][ckpt.RUN_CONFIG] = {"size": (copy / ckpt.RUN_CONFIG).stat().st_size,
                                          "crc32": file_crc32(copy / ckpt.RUN_CONFIG)}
    (copy / ckpt.MANIFEST).write_text(json.dumps(manifest))
    out = tmp_path / "hf_model"
    assert main(["export", "--checkpoint", str(copy), "--out", str(out)]) == 2
    assert (f"data.tokenizer '{tmp_path / 'moved_tokenizer'}': no such directory (the run's, from its "
            f"run_config.json); give the tokenizer's directory with --tokenizer DIR") in capsys.readouterr().err
    assert not out.exists()
    assert main(["export", "--checkpoint", str(copy), "--out", str(out), "--tokenizer", str(base / "tokenizer")]) == 0
    assert (out / "tokenizer.json").is_file()
