"""The ``ring-attn`` command line: check (under torchrun), bench, env."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, timeout=240):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def _torchrun(nproc, *args):
    # --standalone: a local rendezvous on a free port, so tests never collide on 29500.
    return _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                 "-m", "ring_flash_attn", *args])


def test_check_passes_on_three_ranks_at_the_default_length():
    """3 ranks (like 6 or 12, one Aurora node) cannot split 1024 into 2P chunks: the default length adapts."""
    result = _torchrun(3, "check", "--device", "cpu", "--heads", "4", "--heads-k", "2", "--head-dim", "8")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.rstrip().endswith("OK")]
    assert len(lines) == 3 * 4, result.stdout  # every rank, every variant
    assert "seqlen 1026" in result.stdout
    assert "all ranks match full attention" in result.stdout


def test_check_default_length_splits_at_any_world_size():
    from ring_flash_attn.check import DEFAULT_MIN_SEQLEN, default_seqlen

    for world_size in range(1, 65):
        seqlen, unit = default_seqlen(world_size), 2 * world_size
        assert seqlen % unit == 0 and DEFAULT_MIN_SEQLEN <= seqlen < DEFAULT_MIN_SEQLEN + unit, world_size


@pytest.mark.parametrize("command", [["--help"], ["check", "--help"], ["bench", "--help"], ["train", "--help"]])
def test_help_texts_are_plain_text(command, capsys):
    """No reStructuredText markup or internal module paths in what users read first (in-process: the same
    parsers the command line builds)."""
    from ring_flash_attn.cli import main

    with pytest.raises(SystemExit) as leaving:
        main(command)
    assert leaving.value.code == 0
    shown = capsys.readouterr().out
    assert "usage: ring-attn" in shown
    for markup in ("``", ":func:", ":mod:", ":class:", "ring_flash_attn/"):
        assert markup not in shown, (command, markup)


class _Exited(Exception):
    pass


@pytest.mark.parametrize("started", [True, False])
@pytest.mark.parametrize("outcome, code", [(0, 0), (3, 3), (None, 0), (SystemExit(2), 2), (SystemExit("bad"), 1),
                                           (ValueError("boom"), 1), (KeyboardInterrupt(), 130)])
def test_process_exit_code(outcome, code, started, monkeypatch, capsys):
    """``run``: the entry's exit code in every way it can end; a process that took part in a process group
    leaves through ``os._exit`` (no interpreter finalization, see cli_common.run), any other through
    ``sys.exit``."""
    from ring_flash_attn import cli_common as cli
    from ring_flash_attn.comm import launch

    def entry():
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def fake_exit(value):
        raise _Exited(value)

    monkeypatch.setattr(launch, "_started", started)
    monkeypatch.setattr(cli.os, "_exit", fake_exit)
    with pytest.raises(_Exited if started else SystemExit) as leaving:
        cli.run(entry)
    assert (leaving.value.args[0] if started else leaving.value.code) == code
    if isinstance(outcome, Exception) and not isinstance(outcome, SystemExit):
        assert "boom" in capsys.readouterr().err  # the traceback, as Python prints an uncaught one


def test_check_fails_loudly_on_mismatch():
    """A tolerance below float32 rounding must turn into a non-zero exit on every rank."""
    result = _torchrun(2, "check", "--device", "cpu", "--seqlen", "64", "--heads", "2", "--heads-k", "1",
                       "--head-dim", "16", "--rtol", "1e-12", "--variants", "zigzag")
    assert result.returncode != 0
    assert "MISMATCH" in result.stdout


def test_check_rejects_unsplittable_length():
    result = _torchrun(2, "check", "--device", "cpu", "--seqlen", "30")
    assert result.returncode != 0
    assert "--seqlen: must be a multiple of 2 x world size = 4 (zigzag's chunks), got 30" in result.stdout + result.stderr


def test_help_imports_neither_torch_nor_a_subcommand():
    """`ring-attn --help` builds every sub-command's parser and imports no torch (it took seconds before)."""
    heavy = ("torch", "transformers", "ring_flash_attn.functional", "ring_flash_attn.bench",
             "ring_flash_attn.train.trainer")
    code = ("import sys\nfrom ring_flash_attn.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n"
            f"    pass\nprint('HEAVY', sorted(m for m in sys.modules if m in {heavy!r}))")
    result = _run([sys.executable, "-c", code], timeout=60)
    assert result.returncode == 0, result.stderr
    assert "usage: ring-attn" in result.stdout and "HEAVY []" in result.stdout, result.stdout


def test_cli_modules_import_one_way():
    """cli.py dispatches to the sub-commands; they share cli_common.py and never import cli.py back."""
    import ast

    package = os.path.join(REPO, "ring_flash_attn")
    for path in [os.path.join(package, name) for name in ("check.py", "bench.py", "cli_common.py")] + [
            os.path.join(package, "train", name) for name in os.listdir(os.path.join(package, "train"))
            if name.endswith(".py")]:
        tree = ast.parse(open(path, encoding="utf-8").read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert node.module not in ("cli", "ring_flash_attn.cli") or node.level not in (1, 2), path


def test_bench_needs_an_output_directory(capsys):
    """`ring-attn bench` writes where the user says, not into ./benchmarks/results of any directory."""
    from ring_flash_attn.cli import main

    with pytest.raises(SystemExit) as leaving:
        main(["bench", "--device", "cpu", "--world-sizes", "1"])
    assert leaving.value.code == 2
    assert "the following arguments are required: --out-dir" in capsys.readouterr().err


def test_env_under_a_launcher_labels_every_line_with_its_rank(monkeypatch, capsys):
    from ring_flash_attn.cli import main

    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    assert main(["env"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) > 5 and all(line.startswith("[rank 1] ") for line in lines), lines


def test_error_line_is_one_write_ending_in_a_newline(monkeypatch):
    """Ranks sharing a log never fuse their error lines: each is one write (print makes two)."""
    from ring_flash_attn import cli_common

    class Recorder:
        def __init__(self):
            self.writes = []

        def write(self, text):
            self.writes.append(text)

        def flush(self):
            pass

    stream = Recorder()
    monkeypatch.setattr(cli_common.sys, "stderr", stream)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    cli_common.error_line("checkpoint x: broken\n  details")
    assert stream.writes == ["[rank 3] error: checkpoint x: broken details\n"]


def test_unknown_train_option_gets_a_suggestion(capsys):
    from ring_flash_attn.cli import main

    with pytest.raises(SystemExit) as leaving:
        main(["train", "--stpes", "3"])
    assert leaving.value.code == 2
    assert "unknown option --stpes (did you mean --steps?)" in capsys.readouterr().err


def test_package_names_resolve_lazily():
    """Every public name and the replaced project's per-variant modules resolve through the lazy __init__."""
    import ring_flash_attn

    for name in ring_flash_attn.__all__:
        assert getattr(ring_flash_attn, name) is not None, name
    assert ring_flash_attn.zigzag_ring_flash_attn.zigzag_ring_flash_attn_func is \
        ring_flash_attn.zigzag_ring_flash_attn_func
    assert set(ring_flash_attn.__all__) <= set(dir(ring_flash_attn))


def test_bench_writes_json_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    result = _run([sys.executable, "-m", "ring_flash_attn", "bench", "--device", "cpu", "--seqlens", "64",
                   "--world-sizes", "2", "--heads", "2", "--heads-k", "1", "--head-dim", "16", "--rounds", "1",
                   "--reps", "1", "--warmup", "1", "--out-dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "ring_step.json").read_text())
    assert {row["schedule"] for row in data["rows"]} == {"ring", "zigzag"}
    assert all(row["sdpa-fused_fwd_eff"] > 0 for row in data["rows"])
    assert (tmp_path / "ring_step.png").stat().st_size > 0


def test_env_json():
    result = _run([sys.executable, "-m", "ring_flash_attn", "env", "--json"])
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["versions"]["torch"]
