"""Config loading, overrides and checks: every mistake is an error that names the key."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from ring_flash_attn.train import add_train_parser
from ring_flash_attn.train.config import ConfigError, load_config, parse_overrides, validate_for_world

from .helpers import REPO_ROOT, write_config


def test_defaults_and_overrides(tmp_path):
    path = write_config(tmp_path)
    config = load_config(str(path), [("train.steps", "9"), ("train.lr", "2e-4"), ("data.path", "null")])
    assert config.train.steps == 9
    assert config.train.lr == pytest.approx(2e-4)  # "2e-4" is a YAML string; float fields accept it
    assert config.parallel.cp == 2 and config.parallel.variant == "zigzag"
    assert config.checkpoint_dir() == Path(config.log.dir) / "checkpoints"


@pytest.mark.parametrize("override, message", [
    (("train.stpes", "3"), "'train.stpes' is not known (did you mean 'steps'?)"),
    (("trian.steps", "3"), "'trian' is not known"),
    (("train.steps", "three"), "train.steps: expected int, got 'three'"),
    (("train.steps", "0"), "train.steps: expected a positive value, got 0"),
    (("log.progress", "fancy"), "log.progress: expected one of ['auto', 'bar', 'lines', 'off'], got 'fancy'"),
    (("parallel.variant", "spiral"), "parallel.variant: expected one of"),
    (("data.source", "files"), "data.path: data.source is 'files'"),
    (("model.num_key_value_heads", "3"), "model.num_key_value_heads: must divide"),
    (("parallel.ulysses", "3"), "parallel.ulysses: must divide parallel.cp"),
    (("parallel.ulysses", "0"), "parallel.ulysses: expected a positive value, got 0"),
    (("model.num_attention_heads", "0"), "model.num_attention_heads: expected a positive value, got 0"),
    (("model.num_key_value_heads", "0"), "model.num_key_value_heads: expected a positive value, got 0"),
    (("model.intermediate_size", "-64"), "model.intermediate_size: expected a positive value, got -64"),
    (("parallel.timeout_s", "nan"), "parallel.timeout_s: expected a finite number, got 'nan'"),
    (("parallel.timeout_s", ".inf"), "parallel.timeout_s: expected a finite number, got inf"),
    (("parallel.timeout_s", "1e-6"), "parallel.timeout_s: expected at least 1 s (joining the process group alone takes "
                                     "longer than less), got 1e-06"),
    (("train.lr", "nan"), "train.lr: expected a finite number, got 'nan'"),
    (("train.beta2", "1.0"), "train.beta2: expected a value in [0, 1) (AdamW's moment decay), got 1.0"),
    (("train.warmup_steps", "-1"), "train.warmup_steps: expected >= 0 (0 = no warm-up), got -1"),
    (("train.grad_clip", "-1.0"), "train.grad_clip: expected >= 0 (0 = no clipping), got -1.0"),
    (("model.rope_theta", "0"), "model.rope_theta: expected a positive value, got 0.0"),
    (("train.activation_checkpointing", "yes"),
     "train.activation_checkpointing: expected one of ['auto', 'none', 'full', 'every_n'], got True (YAML reads an "
     "unquoted yes/no/on/off/true/false as a boolean: write one of the choices)"),
    (("train.nonfinite", "ignore"), "train.nonfinite: expected one of ['error', 'skip'], got 'ignore'"),
    (("log.dir", ""), "log.dir: expected a directory, got an empty string"),
    (("data.max_bytes", "2.5"), "data.max_bytes: expected an integer, got 2.5 (not a whole number)"),
    (("train.steps", "1e400"), "train.steps: expected an integer, got '1e400' (not a whole number)"),
])
def test_bad_values_name_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError) as info:
        load_config(str(write_config(tmp_path)), [override])
    assert message in str(info.value)


def test_integers_in_exponent_form(tmp_path):
    """docs/training.md writes max_bytes as 4e6, which YAML 1.1 reads as a string: whole numbers are accepted in
    any spelling a number has."""
    path = write_config(tmp_path, data={"max_bytes": "4e6", "seq_len": 64})
    config = load_config(str(path), [("train.steps", "1e2"), ("checkpoint.every", "5.0")])
    assert (config.data.max_bytes, config.train.steps, config.checkpoint.every) == (4_000_000, 100, 5)
    assert all(type(v) is int for v in (config.data.max_bytes, config.train.steps, config.checkpoint.every))
    (tmp_path / "doc.yaml").write_text("data:\n  max_bytes: 4e6\n")
    assert load_config(str(tmp_path / "doc.yaml")).data.max_bytes == 4_000_000


def test_unknown_key_in_yaml(tmp_path):
    path = write_config(tmp_path, checkpoint={"evrey": 5})
    with pytest.raises(ConfigError, match=r"'checkpoint.evrey' is not known \(did you mean 'every'\?\)"):
        load_config(str(path))


def test_a_config_file_that_is_not_a_mapping(tmp_path):
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"list.yaml: expected a mapping of sections \(model:, data:, train:, "
                                          r"\.\.\.\) at the top, got a list"):
        load_config(str(tmp_path / "list.yaml"), [("log.dir", "x")])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(str(tmp_path / "absent.yaml"))


def test_shipped_configs_by_bare_name(tmp_path, monkeypatch):
    """`--config cpu_demo.yaml` (or `cpu_demo`) from any directory: the example configs ship with the package."""
    monkeypatch.chdir(tmp_path)
    assert load_config("cpu_demo.yaml") == load_config("cpu_demo") == load_config(str(REPO_ROOT / "configs" /
                                                                                       "cpu_demo.yaml"))
    with pytest.raises(ConfigError, match=r"--config: no such file 'cpu_dmeo' \(did you mean 'cpu_demo'\?\); a "
                                          r"file, or one of the configs that ship with ring_flash_attn: .*cpu_demo"):
        load_config("cpu_dmeo")


def test_the_package_ships_every_example_config(tmp_path):
    """What a wheel holds (setup.py's build of the package): configs/*.yaml as ring_flash_attn/configs. CI's README
    run (.ci/run, a non-editable install) starts the demo by the bare name as well."""
    pytest.importorskip("setuptools", reason="building the package's files needs setuptools")
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)], cwd=REPO_ROOT,
                   check=True, capture_output=True)
    shipped = sorted(p.name for p in (tmp_path / "ring_flash_attn" / "configs").glob("*.yaml"))
    assert shipped and shipped == sorted(p.name for p in (REPO_ROOT / "configs").glob("*.yaml"))


def test_world_checks(tmp_path):
    config = load_config(str(write_config(tmp_path)))
    assert validate_for_world(config, 4) == 2  # dp = world / cp
    with pytest.raises(ConfigError, match="world size 3 must be a multiple of the context-parallel degree, got cp=2"):
        validate_for_world(config, 3)
    with pytest.raises(ConfigError, match=r"this is a single process: launch with torchrun, e\.g\. torchrun "
                                          r"--standalone --nproc_per_node 4 -m ring_flash_attn train \.\.\., or set "
                                          r"--parallel\.cp 1"):
        validate_for_world(config, 1)
    odd = load_config(str(write_config(tmp_path, data={"seq_len": 66})), [("parallel.cp", "4")])
    with pytest.raises(ConfigError, match="data.seq_len: cannot split over cp=4.*multiple of 8, got 66"):
        validate_for_world(odd, 4)


def test_parse_overrides():
    assert parse_overrides(["--train.steps", "10", "--log.dir=x y"]) == [("train.steps", "10"), ("log.dir", "x y")]
    with pytest.raises(ConfigError, match="missing its value"):
        parse_overrides(["--train.steps"])


def test_subcommand_parser_accepts_overrides_and_shortcuts():
    """As wired into the ring-attn CLI: a parent parser calling parse_args must not reject --section.key."""
    parent = argparse.ArgumentParser(prog="ring-attn")
    add_train_parser(parent.add_subparsers(dest="command", required=True))
    args = parent.parse_args(["train", "--config", "c.yaml", "--train.steps", "7", "--cp", "4", "--resume",
                              "--log.dir=out"])
    assert args.config == "c.yaml" and args.resume and not args.check
    assert args.overrides == ["--train.steps", "7", "--log.dir=out"]
    assert args.shortcut_cp == "4"
    assert callable(args.handler)
    with pytest.raises(SystemExit):
        parent.parse_args(["train", "--no-such-flag"])


def test_help_is_plain_text_for_users(capsys):
    parent = argparse.ArgumentParser(prog="ring-attn")
    add_train_parser(parent.add_subparsers(dest="command", required=True))
    with pytest.raises(SystemExit):
        parent.parse_args(["train", "--help"])
    text = capsys.readouterr().out
    assert "torchrun --standalone --nproc_per_node 4 -m ring_flash_attn train --config cpu_demo.yaml" in text
    for internal in ("``", ":func:", ":mod:", "the command line of the trainer"):
        assert internal not in text


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO_ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_load(name):
    config = load_config(str(REPO_ROOT / "configs" / name))
    assert config.train.steps > 0
