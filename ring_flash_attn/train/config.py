"""The training run's configuration: YAML file + ``--section.key value`` overrides, checked before anything starts.

A config is data (nested dataclasses), read from YAML, then overridden from
the command line. Every key is known in advance: a misspelt or unknown key is
an error that names it and suggests the closest known one, never silently
ignored. Checks that need the world size (``validate_for_world``) depend only
on values every rank has, so a bad config fails the same way on every rank
before any collective.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key, what was expected and what was given."""


@dataclass
class ModelConfig:
    family: str = "llama"                 # a transformers ``model_type`` with a causal-LM head
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    rope_theta: Optional[float] = None    # rotary base; None: the pretrained model's, or 10000 for a new one
    rope_scaling: Optional[Dict[str, Any]] = None  # transformers' rope parameters, e.g. {rope_type: llama3 |
                                          # yarn | linear | dynamic, factor: 8, original_max_position_embeddings: ...}
    pretrained: Optional[str] = None      # a local transformers model directory (config.json + safetensors);
                                          # the architecture keys above are then the directory's, not these
    extra: Dict[str, Any] = field(default_factory=dict)  # more transformers config fields, passed through as-is


@dataclass
class DataConfig:
    source: str = "stdlib"                # "stdlib": this Python's own sources; "files": data.path
    path: Optional[str] = None            # a file, a directory or a glob (source "files")
    format: str = "text"                  # "text": each file is a document; "jsonl": one JSON object a line;
                                          # "parquet": files of rows; "hf_dataset": a datasets save_to_disk dir
    text_key: str = "text"                # the field (jsonl) or column (parquet, hf_dataset) holding the document
    tokenizer: Optional[str] = None       # a local tokenizer directory (transformers); None: bytes as tokens
    cache_dir: Optional[str] = None       # token caches (tokenizer only); default ~/.cache/ring_flash_attn/tokens;
                                          # on a file system every rank sees
    seq_len: int = 1024                   # tokens per sequence (the full sequence, before context-parallel split)
    document_mask: bool = False           # each packed document attends only within itself (positions restart);
                                          # context parallelism then all-gathers K/V over contiguous pieces (llama3)
    max_bytes: int = 4_000_000            # stop reading the corpus after this many bytes
    seed: int = 0                         # shuffles the order of packed sequences


@dataclass
class TrainConfig:
    steps: int = 100
    micro_batch_size: int = 1             # sequences per data-parallel replica per micro-step
    grad_accum: int = 1                   # micro-steps per optimizer step
    lr: float = 1e-3
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1             # cosine decay ends at lr * min_lr_ratio
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0                # max global gradient norm; 0 = off
    seed: int = 0                         # model initialisation and RNG streams
    precision: str = "fp32"               # "fp32", or "bf16" (bfloat16 compute, float32 weights, optimizer, reduction)
    activation_checkpointing: str = "auto"  # per decoder layer: none, full (every layer), every_n, or auto (none
                                          # while the memory plan fits the device, else full)
    activation_checkpointing_n: int = 2   # every_n: checkpoint layers 0, n, 2n, ...
    offload_activations: Optional[bool] = None  # checkpointed layer inputs in pinned host memory (CUDA, XPU);
                                          # null: on when the memory plan says they do not fit the device
    loss_chunk_mib: Optional[float] = None  # memory budget of one chunk of the loss (logits and their gradient);
                                          # null: a 64th of the device's memory per rank, at most 1024
    tile_mib: float = 1024.0              # memory budget of one tile of a token-wise module's intermediates (MLPs,
                                          # norms): longer sequences run them over tiles of tokens, recomputed in
                                          # the backward; 0 = never
    compile: bool = False                 # torch.compile each decoder layer
    compile_backend: str = "inductor"     # torch.compile's backend (aot_eager: no code generation, for tests)
    nonfinite: str = "error"              # a step whose loss or gradient norm is NaN/inf: "error" stops every rank
                                          # before the optimizer step; "skip" drops that step (weights and optimizer
                                          # state unchanged) and counts it in the log


@dataclass
class ParallelConfig:
    cp: int = 1                           # context-parallel degree; the rest of the world is data-parallel
    variant: str = "zigzag"               # sequence layout over the CP ranks: zigzag, ring or stripe
    ulysses: int = 1                      # Ulysses degree inside cp (USP: cp = ulysses x ring); heads split by it
    attn_backend: Optional[str] = None    # force a local attention kernel (see ring_flash_attn.kernels)
    device: str = "auto"                  # auto, cpu, cuda or xpu
    dist_backend: Optional[str] = None    # force a torch.distributed backend (gloo, nccl, xccl, ccl)
    timeout_s: float = 600.0              # a collective waiting longer than this fails the run
    fsdp_replicate: int = 1               # hybrid sharding: replicate over this many groups of consecutive ranks
                                          # (one per node), shard within each; 1 = shard over every rank
    cpu_offload: Optional[bool] = None    # FSDP2 keeps weights, gradients and optimizer state in host memory and
                                          # steps the optimizer there (CUDA, XPU); null: on when the memory plan
                                          # says the states do not fit beside the activations
    device_memory_gib: Optional[float] = None  # the memory the plan assumes per rank; null: the device's own


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None             # default: <log.dir>/checkpoints
    every: int = 0                        # save every N steps (0 = only at the end); always at exit
    keep: int = 2                         # complete checkpoints kept; older ones are deleted after a save
    resume: bool = False                  # continue from the newest complete checkpoint in dir, if any
    verify: bool = True                   # check every file's size and CRC32 before loading
    save: bool = True                     # false: write no checkpoint at all (benchmarks, capacity trials)


@dataclass
class LogConfig:
    dir: str = "runs/train"
    progress: str = "auto"                # auto (bar on a terminal, lines otherwise), bar, lines, off
    every: int = 1                        # progress lines every N steps (the JSONL log has every step)
    plot: bool = True                     # loss-vs-step PNG at the end (needs matplotlib)
    peak_tflops: Optional[float] = None   # the device's peak dense TFLOP/s for MFU; default: known devices' table
    profile_steps: int = 0                # profile this many steps (--profile N): a trace per rank, top ops printed
    profile_after: int = 3                # ... after this many warm-up steps of the run


@dataclass
class CheckConfig:
    steps: int = 3                        # steps compared in --check mode
    rtol: Optional[float] = None          # relative loss tolerance; default by precision (DEFAULT_CHECK_RTOL)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    check: CheckConfig = field(default_factory=CheckConfig)

    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.log.dir) / "checkpoints"

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


# The shortest collective timeout a run can start with: connecting the ranks takes longer than less.
MIN_TIMEOUT_S = 1.0

# Context parallelism and full attention on one rank sum in different orders; over a few optimizer steps
# float32 losses agree to a few ulps of the accumulated error, bfloat16 ones to its 8-bit mantissa.
DEFAULT_CHECK_RTOL = {"fp32": 1e-4, "bf16": 2e-2}

CHOICES = {
    "data.source": ("stdlib", "files"),
    "data.format": ("text", "jsonl", "parquet", "hf_dataset"),
    "train.precision": ("fp32", "bf16"),
    "train.activation_checkpointing": ("auto", "none", "full", "every_n"),
    "train.nonfinite": ("error", "skip"),
    "parallel.device": ("auto", "cpu", "cuda", "xpu"),
    "log.progress": ("auto", "bar", "lines", "off"),
}


def _number(value: Any) -> Optional[float]:
    """``value`` as a float when it is a number or a string float() reads (YAML 1.1 reads "3e-4" and "4e6",
    which have no dot, as strings), else None; booleans are not numbers here."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """``value`` as ``annotation`` (int, float, bool, str, dict, Optional of those), or ConfigError."""
    origin = get_origin(annotation)
    if origin is Union:  # Optional[X]
        if value is None:
            return None
        (inner,) = [a for a in get_args(annotation) if a is not type(None)]
        return _coerce(value, inner, key)
    if annotation is Any:
        return value
    if origin in (dict, Dict) or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        number = _number(value)  # 4e6, 4.0e+6, 1e3: integers written in exponent form
        if number is not None:
            if math.isfinite(number) and number.is_integer():
                return int(number)
            raise ConfigError(f"config key {key}: expected an integer, got {value!r} (not a whole number)")
    elif annotation is float:
        number = _number(value)
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"config key {key}: expected a finite number, got {value!r}")
            return number
    elif annotation is str:
        if isinstance(value, str):
            return value
    type_name = getattr(annotation, "__name__", str(annotation))
    raise ConfigError(f"config key {key}: expected {type_name}, got {value!r} ({type(value).__name__})")


def _check_choice(key: str, value: Any) -> None:
    if value in CHOICES[key] and isinstance(value, str):
        return
    hint = (" (YAML reads an unquoted yes/no/on/off/true/false as a boolean: write one of the choices)"
            if isinstance(value, bool) else "")
    raise ConfigError(f"config key {key}: expected one of {list(CHOICES[key])}, got {value!r}{hint}")


def _unknown_key(key: str, known: List[str]) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"config key {key!r} is not known{hint}; known keys here: {', '.join(sorted(known))}")


def _build(cls, raw: Dict[str, Any], prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or '<top>'}: expected a mapping, got {raw!r}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            raise _unknown_key(prefix + str(key), names)
    kwargs = {}
    for name in names:
        if name not in raw:
            continue
        key = prefix + name
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], raw[name] or {}, key + ".")
        elif key in CHOICES:
            _check_choice(key, raw[name])
            kwargs[name] = raw[name]
        else:
            kwargs[name] = _coerce(raw[name], hints[name], key)
    return cls(**kwargs)


def apply_override(raw: Dict[str, Any], dotted_key: str, text: str) -> None:
    """Set ``raw[a][b] = yaml(text)`` for ``dotted_key`` "a.b"; the value is parsed as YAML ("8" -> 8, "null")."""
    parts = dotted_key.split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override --{dotted_key}: expected --<section>.<key> (e.g. --train.steps 10)")
    section, key = parts
    target = raw.setdefault(section, {})
    if not isinstance(target, dict):
        raise ConfigError(f"config section {section}: expected a mapping, got {target!r}")
    target[key] = yaml.safe_load(text) if text != "" else ""


def parse_overrides(argv: List[str]) -> List[tuple]:
    """``["--train.steps", "10", "--log.dir=x"]`` -> ``[("train.steps", "10"), ("log.dir", "x")]``."""
    pairs, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"argument {arg!r}: expected a config override --<section>.<key> <value>")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"override {arg}: missing its value")
            key, value = arg[2:], argv[i + 1]
            i += 2
        pairs.append((key, value))
    return pairs


def shipped_configs() -> Optional[Path]:
    """The directory of the example configs that ship with the package: ring_flash_attn/configs where the
    package is installed (setup.py puts configs/ there), configs/ of a source checkout; None if neither."""
    package = Path(__file__).resolve().parents[1]
    installed, checkout = package / "configs", package.parent / "configs"
    if installed.is_dir():
        return installed
    if checkout.is_dir() and (package.parent / "setup.py").is_file():
        return checkout
    return None


def find_config(name: str) -> Path:
    """``--config``: a YAML file, or the name of a shipped example config (``cpu_demo.yaml`` or ``cpu_demo``)."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    shipped = shipped_configs()
    if shipped is not None and path.parent == Path("."):
        for candidate in (shipped / path.name, shipped / f"{path.name}.yaml"):
            if candidate.is_file():
                return candidate
    names = sorted(p.name for p in shipped.glob("*.yaml")) if shipped is not None else []
    close = difflib.get_close_matches(path.name, names + [n[:-len(".yaml")] for n in names], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"--config: no such file {name!r}{hint}; a file, or one of the configs that ship with "
                      f"ring_flash_attn: {', '.join(names) or 'none found'}")


def load_config(path: Optional[str], overrides: List[tuple] = ()) -> RunConfig:
    """The config from the YAML file at ``path`` (None: defaults) with ``(dotted_key, text)`` overrides applied."""
    raw: Dict[str, Any] = {}
    if path is not None:
        config_path = find_config(path)
        try:
            raw = yaml.safe_load(config_path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"--config {config_path}: not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"--config {config_path}: expected a mapping of sections (model:, data:, train:, ...) "
                              f"at the top, got a {type(raw).__name__}")
    for key, text in overrides:
        apply_override(raw, key, text)
    config = _build(RunConfig, raw, "")
    validate(config)
    return config


def validate(config: RunConfig) -> None:
    """Checks that need nothing but the config."""
    positive = {"data.seq_len": config.data.seq_len, "data.max_bytes": config.data.max_bytes,
                "train.steps": config.train.steps, "train.micro_batch_size": config.train.micro_batch_size,
                "train.grad_accum": config.train.grad_accum, "parallel.cp": config.parallel.cp,
                "parallel.timeout_s": config.parallel.timeout_s, "check.steps": config.check.steps,
                "log.every": config.log.every, "checkpoint.keep": config.checkpoint.keep,
                "model.hidden_size": config.model.hidden_size,
                "model.intermediate_size": config.model.intermediate_size,
                "model.num_hidden_layers": config.model.num_hidden_layers,
                "model.num_attention_heads": config.model.num_attention_heads,
                "model.num_key_value_heads": config.model.num_key_value_heads,
                "train.activation_checkpointing_n": config.train.activation_checkpointing_n,
                "parallel.fsdp_replicate": config.parallel.fsdp_replicate, "parallel.ulysses": config.parallel.ulysses}
    optional_positive = {"model.rope_theta": config.model.rope_theta, "log.peak_tflops": config.log.peak_tflops}
    positive.update({key: value for key, value in optional_positive.items() if value is not None})
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"config key {key}: expected a positive value, got {value}")
    if config.train.loss_chunk_mib is not None and not config.train.loss_chunk_mib > 0:
        raise ConfigError(f"config key train.loss_chunk_mib: expected a positive memory budget in MiB, got "
                          f"{config.train.loss_chunk_mib}")
    if config.parallel.device_memory_gib is not None and not config.parallel.device_memory_gib > 0:
        raise ConfigError(f"config key parallel.device_memory_gib: expected a positive size in GiB (or null: the "
                          f"device's own), got {config.parallel.device_memory_gib}")
    non_negative = {"checkpoint.every": "0 = only at exit", "train.warmup_steps": "0 = no warm-up",
                    "train.weight_decay": "0 = none", "train.grad_clip": "0 = no clipping",
                    "check.rtol": "relative loss difference", "train.tile_mib": "0 = untiled",
                    "log.profile_steps": "0 = no profile", "log.profile_after": "warm-up steps before profiling"}
    for key, meaning in non_negative.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value is not None and value < 0:
            raise ConfigError(f"config key {key}: expected >= 0 ({meaning}), got {value}")
    if config.train.lr <= 0:
        raise ConfigError(f"config key train.lr: expected a positive learning rate, got {config.train.lr}")
    if config.parallel.timeout_s < MIN_TIMEOUT_S:
        raise ConfigError(f"config key parallel.timeout_s: expected at least {MIN_TIMEOUT_S:g} s (joining the process "
                          f"group alone takes longer than less), got {config.parallel.timeout_s:g}")
    for key in ("train.beta1", "train.beta2"):
        value = getattr(config.train, key.split(".")[1])
        if not 0 <= value < 1:
            raise ConfigError(f"config key {key}: expected a value in [0, 1) (AdamW's moment decay), got {value}")
    if not 0 <= config.train.min_lr_ratio <= 1:
        raise ConfigError(f"config key train.min_lr_ratio: expected a value in [0, 1], got {config.train.min_lr_ratio}")
    if not config.log.dir:  # Path("") is the current directory: metrics, lock and checkpoints would land there
        raise ConfigError("config key log.dir: expected a directory, got an empty string")
    if config.data.source == "files" and not config.data.path:
        raise ConfigError("config key data.path: data.source is 'files', so data.path must name a file, "
                          "directory or glob; got nothing")
    model = config.model
    if model.hidden_size % model.num_attention_heads:
        raise ConfigError(f"config key model.num_attention_heads: must divide model.hidden_size "
                          f"({model.hidden_size}), got {model.num_attention_heads}")
    if model.num_attention_heads % model.num_key_value_heads:
        raise ConfigError(f"config key model.num_key_value_heads: must divide model.num_attention_heads "
                          f"({model.num_attention_heads}), got {model.num_key_value_heads}")
    from ..ring.layouts import get_layout  # imports torch: not at import time (the command line's --help)

    try:
        get_layout(config.parallel.variant)
    except ValueError as exc:
        raise ConfigError(f"config key parallel.{exc}") from None
    ulysses = config.parallel.ulysses
    if config.parallel.cp % ulysses:
        raise ConfigError(f"config key parallel.ulysses: must divide parallel.cp ({config.parallel.cp}: cp = ulysses "
                          f"x ring), got {ulysses}")
    if not config.model.pretrained and model.num_attention_heads % ulysses:  # a checkpoint's heads: checked at use
        raise ConfigError(f"config key parallel.ulysses: must divide model.num_attention_heads "
                          f"({model.num_attention_heads}): each Ulysses rank attends with its share of the heads, "
                          f"got {ulysses}")
    if ulysses > 1 and config.data.document_mask:
        raise ConfigError("config key parallel.ulysses: data.document_mask runs the all-gather (llama3) exchange, "
                          "which has no Ulysses form; set parallel.ulysses 1")


def _launch_hint(world_size: int) -> str:
    if world_size != 1:
        return ""
    return (" (this is a single process: launch with torchrun, e.g. torchrun --standalone --nproc_per_node 4 -m "
            "ring_flash_attn train ..., or set --parallel.cp 1)")


def validate_for_world(config: RunConfig, world_size: int) -> int:
    """Checks that need the world size; returns the data-parallel degree."""
    cp = config.parallel.cp
    if world_size % cp:
        raise ConfigError(f"config key parallel.cp: the world size {world_size} must be a multiple of the "
                          f"context-parallel degree, got cp={cp}{_launch_hint(world_size)}")
    if world_size % config.parallel.fsdp_replicate:
        raise ConfigError(f"config key parallel.fsdp_replicate: the world size {world_size} must be a multiple of "
                          f"the number of replica groups, got fsdp_replicate={config.parallel.fsdp_replicate}")
    if config.data.document_mask:
        if config.data.seq_len % cp:
            raise ConfigError(f"config key data.seq_len: with data.document_mask each sequence is cut into cp={cp} "
                              f"contiguous pieces, so it must be a multiple of {cp}, got {config.data.seq_len}")
        return world_size // cp
    from ..ring.layouts import get_layout

    try:
        get_layout(config.parallel.variant).check_global(config.data.seq_len, cp)
    except ValueError as exc:
        raise ConfigError(f"config key data.seq_len: cannot split over cp={cp}: {exc}") from None
    return world_size // cp


def config_from_dict(raw: Dict[str, Any]) -> RunConfig:
    """A config from its ``to_dict()`` form (as a checkpoint keeps it), checked as a YAML file would be."""
    config = _build(RunConfig, raw, "")
    validate(config)
    return config
