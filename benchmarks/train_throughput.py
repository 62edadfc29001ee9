"""``ring-attn train`` at cp = 1 against a plain transformers training loop with SDPA: one GPU, one call.

The same model (the trainer's own ``build_model`` of the config below), the same batch (one sequence of
the shape's length from the same packed corpus), bf16 compute, AdamW. Timed: tokens/s per device and
model TFLOP/s (torchtitan's count, 6 x matrix weights + attention, causal halved:
``ring_flash_attn.train.flops``) and MFU, the median of the steps after ``--warmup``; peak memory.
Per shape (``--shapes NAME:LENGTH ...``; default the 340M Llama at 16k, and the Llama-3.2-1B shape, vocabulary
128,256, at 16k and 64k): the plain loop eager and compiled (in this process; from 32k on with transformers'
gradient checkpointing, as a user must to fit), and ``ring-attn train`` eager and compiled with its defaults
(each a fresh ``python -m ring_flash_attn train`` process, its own metrics.jsonl); for the 340M shape also
with activation checkpointing forced.

    python benchmarks/train_throughput.py --out benchmarks/results/train_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ring_flash_attn.train import trainer  # noqa: E402
from ring_flash_attn.train.config import load_config  # noqa: E402
from ring_flash_attn.train.data import PackedDataset  # noqa: E402
from ring_flash_attn.train.flops import flops_per_token, peak_tflops  # noqa: E402
from ring_flash_attn.train.metrics import read_metrics  # noqa: E402

SHAPES = {
    # A ~340M-parameter Llama (GQA 16/8 heads, head dim 64) on bytes: the shape of issue 12's measurement.
    "340m": dict(family="llama", hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                 num_attention_heads=16, num_key_value_heads=8),
    # Llama-3.2-1B's shape (tied embeddings, vocabulary 128,256; byte data, so only ids below 257 occur).
    "1b": dict(family="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, rope_theta=500000.0, extra={"vocab_size": 128256, "tie_word_embeddings": True}),
}
DEFAULT_SHAPES = ["340m:16384", "1b:16384", "1b:65536"]
PLAIN_CHECKPOINTING_FROM = 32768  # a plain loop needs gradient checkpointing to fit from here on
TRAINER_RUNS = {  # name: config overrides
    "ring-attn train": [],
    "ring-attn train, compile": ["--train.compile", "true"],
}
FORCED_CHECKPOINTING = {  # 340M only: the cost of recomputation
    "ring-attn train, activation checkpointing": ["--train.activation_checkpointing", "full"],
    "ring-attn train, compile + activation checkpointing": ["--train.compile", "true",
                                                            "--train.activation_checkpointing", "full"],
}


def write_config(directory: Path, model: dict, seq_len: int, steps: int) -> Path:
    config = {"model": model,
              "data": {"source": "stdlib", "seq_len": seq_len, "max_bytes": 4 * (steps + 2) * (seq_len + 1)},
              "train": {"steps": steps, "micro_batch_size": 1, "lr": 3.0e-4, "warmup_steps": 1, "precision": "bf16"},
              "parallel": {"cp": 1, "device": "cuda"},
              "checkpoint": {"save": False},
              "log": {"every": 1, "plot": False, "progress": "lines"}}
    path = directory / "throughput.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def summarize(step_times, tokens_per_step: int, flops: float, peak) -> dict:
    seconds = statistics.median(step_times)
    tflops = flops * tokens_per_step / seconds / 1e12
    return {"step_s": seconds, "tokens_per_s": tokens_per_step / seconds, "tflops": tflops,
            "mfu": tflops / peak if peak else None}


def trainer_run(config_path: Path, overrides, log_dir: Path, warmup: int, timeout_s: float) -> dict:
    command = [sys.executable, "-m", "ring_flash_attn", "train", "--config", str(config_path),
               "--log.dir", str(log_dir), *overrides]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                          text=True, timeout=timeout_s)
    if done.returncode:
        raise RuntimeError(f"exit {done.returncode}: {(done.stderr or done.stdout)[-1500:]}")
    records = read_metrics(log_dir / "metrics.jsonl")[warmup:]
    return {"step_s": statistics.median(r["step_time_s"] for r in records),
            "tokens_per_s": statistics.median(r["tokens_per_s_per_device"] for r in records),
            "tflops": statistics.median(r["tflops_per_device"] for r in records),
            "mfu": statistics.median(r["mfu"] for r in records) if records[0]["mfu"] is not None else None,
            "peak_memory_gib": max(r["peak_memory_bytes"] for r in records) / 2 ** 30,
            "process_s": time.perf_counter() - started}


def plain_loop(config_path: Path, steps: int, warmup: int, compiled: bool) -> dict:
    """model(input_ids) -> cross-entropy over float32 logits -> backward -> fused AdamW, under bf16 autocast, SDPA
    attention; transformers' gradient checkpointing from PLAIN_CHECKPOINTING_FROM tokens on."""
    config = load_config(str(config_path))
    dataset = PackedDataset.from_config(config.data)
    device = torch.device("cuda")
    model = trainer.build_model(config, "sdpa").to(device)
    if config.data.seq_len >= PLAIN_CHECKPOINTING_FROM:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    flops = flops_per_token(model, config.data.seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.train.lr, fused=True)
    forward = torch.compile(model) if compiled else model
    torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(steps):
        sample = dataset.sample(step).to(device)
        inputs, labels = sample[:-1].unsqueeze(0), sample[1:].unsqueeze(0)
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = forward(input_ids=inputs).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        del logits
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    result = summarize(times[warmup:], config.data.seq_len, flops, peak_tflops(device, "bf16", None))
    result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    result["gradient_checkpointing"] = config.data.seq_len >= PLAIN_CHECKPOINTING_FROM
    del model, optimizer, forward
    torch.cuda.empty_cache()
    return result


def _runs(config_path: Path, work: Path, shape: str, args) -> dict:
    runs = {"plain loop (SDPA)": lambda: plain_loop(config_path, args.steps, args.warmup, compiled=False)}
    trainer_runs = dict(TRAINER_RUNS, **(FORCED_CHECKPOINTING if shape.startswith("340m") else {}))
    for name, overrides in trainer_runs.items():
        directory = work / (shape.replace(":", "_") + "_" + name.replace(" ", "_").replace(",", "").replace("+", "plus"))
        runs[name] = (lambda o=overrides, d=directory: trainer_run(config_path, o, d, args.warmup, args.timeout))
    runs["plain loop (SDPA), compiled"] = lambda: plain_loop(config_path, args.steps, args.warmup, compiled=True)
    return runs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="*", default=DEFAULT_SHAPES,
                        help=f"NAME:LENGTH pairs, NAME one of {sorted(SHAPES)}")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=4, help="steps left out of the medians")
    parser.add_argument("--runs", nargs="*", default=None, help="subset of the run names (default: all)")
    parser.add_argument("--timeout", type=float, default=240, help="seconds allowed per trainer process")
    parser.add_argument("--work-dir", default="/tmp/train_throughput", help="configs and trainer logs")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name(), "cudnn": torch.backends.cudnn.version(),
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "shapes": {n: SHAPES[n] for n in SHAPES},
           "steps": args.steps, "warmup": args.warmup}
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    results = {}
    for shape in args.shapes:
        name, length = shape.split(":")
        work = Path(args.work_dir) / shape.replace(":", "_")
        work.mkdir(parents=True, exist_ok=True)
        config_path = write_config(work, SHAPES[name], int(length), args.steps)
        results[shape] = {}
        for run_name, run in _runs(config_path, work, shape, args).items():
            if args.runs and run_name not in args.runs:
                continue
            try:
                results[shape][run_name] = run()
            except Exception as error:  # one failing run is recorded; the others still run
                results[shape][run_name] = {"error": f"{type(error).__name__}: {str(error)[-600:]}"}
            print(f"{shape:12s} {run_name:52s} {json.dumps(results[shape][run_name])}", flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps({"environment": env, "results": results}, indent=1))
    print(json.dumps(env))
    print("| shape | run | tokens/s | TFLOP/s | MFU | peak GiB | vs plain loop (same mode) |\n|---|---|---|---|---|---|---|")
    for shape, runs in results.items():
        for name, r in runs.items():
            if "error" in r:
                print(f"| {shape} | {name} | {r['error'][:80]} | | | | |")
                continue
            base = runs.get("plain loop (SDPA), compiled" if "compile" in name else "plain loop (SDPA)", {})
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a"
            ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.3f}" if base.get("tokens_per_s") else "n/a"
            print(f"| {shape} | {name} | {r['tokens_per_s']:,.0f} | {r['tflops']:.1f} | {mfu} | "
                  f"{r['peak_memory_gib']:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
