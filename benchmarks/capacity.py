"""Long-context capacity on the GPUs of one machine: ``ring-attn capacity`` for a model shape, per memory
setting, beside a plain transformers loop with gradient checkpointing, in one run.

    python benchmarks/capacity.py --model 1b --lengths 131072 262144 --out $OUT/capacity_1b.json
    python benchmarks/capacity.py --model 1b --search 65536 1048576        # doubling + bisection
    python benchmarks/capacity.py --model 1b --layers 2 --lengths 1048576  # memory at a length, 2 of 16 layers

Each length of each setting is a ``ring-attn capacity`` trial (a fresh ``ring-attn train`` process per rank,
``--steps`` steps, no checkpoints; its second step holds the optimizer state, so its peak is the step's
peak). Settings (``--settings``): ``default`` (the memory plan's automatic choices), and each memory-lean
piece turned off alone: ``no-chunked-loss`` (one loss chunk for the whole sequence), ``no-tiling``,
``no-offload`` (activations stay on the device), ``no-state-offload``. The plain loop is transformers'
``gradient_checkpointing_enable`` + cross-entropy over float32 logits + fused AdamW under bf16 autocast.
Results (one JSON) carry the device, versions and date; the printed table is the summary.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
SHAPES = {  # Llama 3 shapes, vocabulary 128,256
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, tie=True),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, tie=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, tie=False),
}
SETTINGS = {
    "default": [],
    "no-chunked-loss": ["--train.loss_chunk_mib", "1000000"],
    "no-tiling": ["--train.tile_mib", "0"],
    "no-offload": ["--train.offload_activations", "false"],
    "no-state-offload": ["--parallel.cpu_offload", "false"],
}

PLAIN = r'''
import sys, time, torch, torch.nn.functional as F
from transformers import LlamaConfig, AutoModelForCausalLM
seq, shape = int(sys.argv[1]), eval(sys.argv[2])
tie = shape.pop("tie")
cfg = LlamaConfig(vocab_size=128256, tie_word_embeddings=tie, rope_theta=500000.0, max_position_embeddings=seq,
                  use_cache=False, **shape)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").cuda()
model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
ids = torch.randint(0, 128256, (1, seq + 1), device="cuda")
torch.cuda.reset_peak_memory_stats()
times = []
for step in range(2):
    torch.cuda.synchronize(); t = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(input_ids=ids[:, :-1]).logits
    loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
    del logits
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True); torch.cuda.synchronize()
    times.append(time.perf_counter() - t)
print("RESULT " + repr({"peak_bytes": torch.cuda.max_memory_allocated(), "step_s": times[-1],
                        "tokens_per_s": seq / times[-1]}))
'''


def write_config(work: Path, shape: dict, layers) -> Path:
    model = {k: v for k, v in shape.items() if k != "tie"}
    if layers:
        model["num_hidden_layers"] = layers
    model.update(family="llama", rope_theta=500000.0,
                 extra={"vocab_size": 128256, "tie_word_embeddings": shape["tie"]})
    config = {"model": model, "data": {"source": "stdlib", "seq_len": 16384},
              "train": {"precision": "bf16", "lr": 1e-4, "warmup_steps": 1},
              "parallel": {"cp": 1, "timeout_s": 1800}, "checkpoint": {"save": False},
              "log": {"plot": False, "progress": "lines"}}
    path = work / "capacity.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def capacity(config: Path, setting: list, low: int, high: int, resolution: int, steps: int, nproc: int,
             work: Path, timeout: float) -> dict:
    out = work / f"capacity_{low}_{high}_{abs(hash(tuple(setting)))}.json"
    command = ["-m", "ring_flash_attn", "capacity", "--config", str(config), "--min-seq-len", str(low), "--max-seq-len",
               str(high), "--resolution", str(resolution), "--steps", str(steps), "--timeout", str(timeout),
               "--work-dir", str(work / out.stem), "--out", str(out), *setting]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    command = [*launcher, *command] if nproc > 1 else [sys.executable, *command]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1"))
    print(done.stdout[-3000:], flush=True)
    if not out.exists():
        return {"error": (done.stderr or done.stdout)[-2000:], "wall_s": time.perf_counter() - started}
    result = json.loads(out.read_text())
    result.pop("config", None)
    result["wall_s"] = time.perf_counter() - started
    return result


def plain(seq: int, shape: dict, timeout: float) -> dict:
    try:
        done = subprocess.run([sys.executable, "-c", PLAIN, str(seq), repr(shape)], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"seq_len": seq, "ok": False, "error": "timeout"}
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return {"seq_len": seq, "ok": True, **eval(line[7:])}
    text = done.stdout + done.stderr
    return {"seq_len": seq, "ok": False, "out_of_memory": "out of memory" in text.lower(),
            "error": text.strip().splitlines()[-1][:300] if text.strip() else f"exit {done.returncode}"}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--layers", type=int, default=None, help="fewer decoder layers than the shape's")
    parser.add_argument("--lengths", type=int, nargs="*", default=[], help="lengths tried one by one")
    parser.add_argument("--search", type=int, nargs=2, metavar=("FROM", "TO"), default=None,
                        help="ring-attn capacity's doubling and bisection between these lengths")
    parser.add_argument("--resolution", type=int, default=None, help="bisection resolution (with --search)")
    parser.add_argument("--settings", nargs="*", default=["default"], choices=sorted(SETTINGS))
    parser.add_argument("--plain", type=int, nargs="*", default=[], help="lengths for the plain transformers loop")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--nproc", type=int, default=1, help="ranks (GPUs) per trial")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one trial may take")
    parser.add_argument("--work-dir", default="/tmp/capacity_bench")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    import torch

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    shape = dict(SHAPES[args.model])
    config = write_config(work, shape, args.layers)
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "model": args.model,
           "layers": args.layers or shape["num_hidden_layers"], "nproc": args.nproc, "steps": args.steps}
    results = {"environment": env, "ring-attn": {}, "plain": []}

    def save():
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1, default=str))

    for name in args.settings:
        runs = []
        for length in args.lengths:
            runs.append(capacity(config, SETTINGS[name], length, length, length, args.steps, args.nproc, work,
                                 args.timeout))
            save()
        if args.search:
            low, high = args.search
            runs.append(capacity(config, SETTINGS[name], low, high, args.resolution or max(1, low // 8), args.steps,
                                 args.nproc, work, args.timeout))
        results["ring-attn"][name] = runs
        save()
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    for length in args.plain:
        results["plain"].append(plain(length, dict(shape), args.timeout))
        print("plain", json.dumps(results["plain"][-1]), flush=True)
        save()
    print(json.dumps(env))
    print("| setting | seq_len | result | peak GiB | plan GiB | tokens/s/device | MFU |\n|---|---|---|---|---|---|---|")
    for name, runs in results["ring-attn"].items():
        for run in runs:
            for t in run.get("trials", []):
                mfu = f"{100 * t['mfu']:.1f} %" if t.get("mfu") else "-"
                peak = f"{t['peak_bytes'] / 2 ** 30:.1f}" if t.get("peak_bytes") else "-"
                plan = f"{t['plan_bytes'] / 2 ** 30:.1f}" if t.get("plan_bytes") else "-"
                status = "ok" if t["ok"] else ("OOM" + (f" in {t['where']}" if t.get("where") else "")
                                               if t.get("out_of_memory") else f"failed: {t.get('error')}")
                print(f"| {name} | {t['seq_len']:,} | {status} | {peak} | {plan} | "
                      f"{t.get('tokens_per_s_per_device') or 0:,.0f} | {mfu} |")
            if "error" in run:
                print(f"| {name} | | error: {run['error'][-200:]!r} | | | | |")
    for p in results["plain"]:
        status = "ok" if p["ok"] else ("OOM" if p.get("out_of_memory") else f"failed: {p.get('error')}")
        peak = f"{p['peak_bytes'] / 2 ** 30:.1f}" if p.get("peak_bytes") else "-"
        print(f"| plain loop | {p['seq_len']:,} | {status} | {peak} | | {p.get('tokens_per_s', 0):,.0f} | |")
    save()


if __name__ == "__main__":
    main()
