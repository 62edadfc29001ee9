"""The files a run reads back (metrics log, checkpoint manifest and train state, token caches, tokenizer
directories) when they are damaged: each is tolerated where a kill can leave it so, or one error naming the
file and what to do (one process; every rank's view of the same errors is in test_train_world.py)."""

import json

import pytest

from ring_flash_attn.train import checkpoint, rundir, tokens
from ring_flash_attn.train.config import ConfigError, DataConfig
from ring_flash_attn.train.metrics import MetricsError, MetricsLog, read_metrics


def _records(*steps):
    return "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in steps)


def test_a_torn_last_metrics_line_is_dropped_with_a_notice(tmp_path, capsys):
    """A kill mid-write leaves a last line without its newline: --resume drops it, keeps the rest."""
    path = tmp_path / "metrics.jsonl"
    path.write_text(_records(1, 2, 3) + '{"step": 4, "lo')
    log = MetricsLog(path, resume_step=2)
    log.write({"step": 3, "loss": 0.5})
    log.close()
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    assert "dropped its last line, which a killed run left half-written (15 bytes)" in capsys.readouterr().out


def test_a_damaged_metrics_line_in_the_middle_names_the_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(_records(1) + "garbage\n" + _records(2))
    with pytest.raises(MetricsError, match=rf"{path}: line 2 is not a step record .*move the file away"):
        MetricsLog(path, resume_step=2)
    assert isinstance(MetricsError("x"), ConfigError)  # every rank hears of it as a configuration error


def _checkpoint(tmp_path, manifest=None, train_state=None):
    path = tmp_path / checkpoint.checkpoint_name(3)
    path.mkdir()
    state = json.dumps({"step": 3, "samples_consumed": 3, "data_fingerprint": "abc", "dp_size": 1, "cp_size": 2})
    (path / checkpoint.TRAIN_STATE).write_text(state if train_state is None else train_state)
    data = (path / checkpoint.TRAIN_STATE).read_bytes()
    from ring_flash_attn.train.files import file_crc32

    good = {"files": {checkpoint.TRAIN_STATE: {"size": len(data), "crc32": file_crc32(path / checkpoint.TRAIN_STATE)}}}
    (path / checkpoint.MANIFEST).write_text(json.dumps(good if manifest is None else manifest))
    return path


@pytest.mark.parametrize("manifest", [
    [], {"files": []}, {"files": {"train_state.json": 5}}, {"nothing": {}}, {"files": {}},
    {"files": {"../train_state.json": {"size": 1, "crc32": 1}, "train_state.json": {"size": 1, "crc32": 1}}},
    {"files": {"train_state.json": {"size": "1", "crc32": 1}}},
])
def test_a_manifest_of_the_wrong_shape_is_a_message_not_a_crash(tmp_path, manifest):
    """Valid JSON of another shape made rank 0 raise TypeError (and the others see a closed connection)."""
    path = _checkpoint(tmp_path, manifest=manifest)
    problem = checkpoint.verify(path, check_crc=True)
    assert problem is not None and problem.startswith(f"checkpoint {path}: manifest.json is not a manifest of "
                                                      f"ring-attn train"), problem
    assert "move it out of the checkpoint directory" in problem


def test_a_good_checkpoint_passes_and_its_train_state_reads_back(tmp_path):
    path = _checkpoint(tmp_path)
    assert checkpoint.verify(path, check_crc=True) is None
    assert checkpoint.read_train_state(path) == checkpoint.TrainState(3, 3, "abc", 1, 2)


@pytest.mark.parametrize("text, problem", [
    ('{"step": 3, "samples_con', "train_state.json is unreadable (JSONDecodeError: "),
    ('{"step": 3}', "train_state.json does not hold the fields"),
    ('[1, 2]', "train_state.json does not hold the fields"),
    ('{"step": "3", "samples_consumed": 3, "data_fingerprint": "abc", "dp_size": 1, "cp_size": 2}',
     "train_state.json does not hold the fields"),
])
def test_a_damaged_train_state_names_its_file(tmp_path, text, problem):
    path = _checkpoint(tmp_path, train_state=text)
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.read_train_state(path)
    assert str(info.value).startswith(f"checkpoint {path}: {problem}"), info.value


def test_a_token_cache_of_another_tokenizer_is_refused_before_training(tmp_path):
    """The cache records its largest id: ids beyond the model's embedding rows fail with the cache's name, not
    with an IndexError inside a step."""
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    (tmp_path / "doc.txt").write_text("x")
    config = DataConfig(source="files", path=str(tmp_path / "doc.txt"), tokenizer=str(tmp_path / "tok"),
                        cache_dir=str(tmp_path))
    tokens.check_vocabulary(config, {"max_token": 319, "eos": 1, "tokenizer": config.tokenizer}, 320)
    with pytest.raises(ConfigError, match=r"data.tokenizer: the token cache .*\.tokens holds token ids up to 400, "
                                          r"beyond the 320 rows of the model's embedding \(it was built with "
                                          r"tokenizer '/elsewhere'\): .*delete the cache files to rebuild them"):
        tokens.check_vocabulary(config, {"max_token": 400, "eos": 1, "tokenizer": "/elsewhere"}, 320)


def test_a_directory_that_is_not_a_tokenizer_says_so_in_full(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError) as info:
        tokens.load_tokenizer(str(tmp_path))
    message = str(info.value)
    assert message == (f"data.tokenizer '{tmp_path}': not a tokenizer directory (it holds none of tokenizer.json, "
                       f"tokenizer_config.json, tokenizer.model, vocab.json, vocab.txt); give the directory a "
                       f"tokenizer was saved to with save_pretrained, often the model's own")
    (tmp_path / "tokenizer.json").write_text("{}")  # a file of that name that is no tokenizer: transformers' words
    tokens.load_tokenizer.cache_clear()
    with pytest.raises(ConfigError) as info:
        tokens.load_tokenizer(str(tmp_path))
    assert "\n" not in str(info.value) and str(info.value).startswith(f"data.tokenizer '{tmp_path}': cannot load")


def test_run_directory_lock_is_exclusive_and_released(tmp_path):
    first = rundir.lock_log_dir(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"is in use by another run \(host .*, pid \d+, started "):
        rundir.lock_log_dir(tmp_path / "run")
    first.release()
    rundir.lock_log_dir(tmp_path / "run").release()  # free again once released (or once its process died)


def test_two_runs_on_one_checkpoint_dir_are_refused(tmp_path):
    """Different log.dirs, one checkpoint.dir: the second run would overwrite and prune (checkpoint.keep) the
    first's checkpoints."""
    first = rundir.claim(tmp_path / "log_a", tmp_path / "shared")
    with pytest.raises(ConfigError, match=rf"checkpoint.dir '{tmp_path / 'shared'}' is in use by another run"):
        rundir.claim(tmp_path / "log_b", tmp_path / "shared")
    rundir.claim(tmp_path / "log_b", tmp_path / "elsewhere").release()  # log_b itself was left unlocked
    first.release()
    inside = rundir.claim(tmp_path / "log_c", tmp_path / "log_c" / "checkpoints")  # covered by log_c's lock
    assert sorted(p.name for p in (tmp_path / "log_c" / "checkpoints").iterdir()) == []
    inside.release()


def test_resume_checks_the_files_it_builds_the_model_from_before_building_it(tmp_path):
    """The model of a resumed run is built from the checkpoint's config.json before the whole checkpoint is
    verified at load: an altered config.json (same size) is caught first, not built into a model of another
    shape."""
    from ring_flash_attn.train import resume
    from ring_flash_attn.train.config import RunConfig
    from ring_flash_attn.train.files import file_crc32

    config = RunConfig()
    config.checkpoint.dir, config.checkpoint.resume = str(tmp_path), True
    path = _checkpoint(tmp_path)
    (path / checkpoint.MODEL_CONFIG).write_text('{"model_type": "llama", "hidden_size": 32}')
    (path / checkpoint.RUN_CONFIG).write_text(json.dumps(config.to_dict()))
    manifest = json.loads((path / checkpoint.MANIFEST).read_text())
    for name in (checkpoint.MODEL_CONFIG, checkpoint.RUN_CONFIG):
        manifest["files"][name] = {"size": (path / name).stat().st_size, "crc32": file_crc32(path / name)}
    (path / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    assert resume.resume_point(config) == path
    (path / checkpoint.MODEL_CONFIG).write_text('{"model_type": "llama", "hidden_size": 36}')
    with pytest.raises(checkpoint.CheckpointError, match="file config.json does not match its CRC32 in the "
                                                         "manifest"):
        resume.resume_point(config)


def test_a_new_run_does_not_overwrite_another_run_s_log(tmp_path):
    """Another run's metrics.jsonl in log.dir (its checkpoints elsewhere, or none saved): a new run used to cut it
    to nothing; with --resume the records past the checkpoint (none yet: all) are dropped as before."""
    from ring_flash_attn.train import trainer

    path = tmp_path / "metrics.jsonl"
    path.write_text(_records(1, 2, 3))
    with pytest.raises(ConfigError, match=r"metrics.jsonl holds the log of another run \(steps 1-3\) that a new run "
                                          r"would overwrite: pass --resume"):
        trainer._open_metrics(path, 0, resuming=False)
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    trainer._open_metrics(path, 0, resuming=True).close()
    assert read_metrics(path) == []
