"""The configuration every layer reads (bottom layer: imports nothing of moecpt but errors). The
training configuration: a tree of typed dataclasses read from TOML, with `--section.key=value` overrides.

Unknown keys and values of the wrong type are errors that name the key. The resolved configuration is
written back as TOML into the run directory, so a run can always be repeated from its own `config.toml`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moecpt.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

IGNORE_INDEX = -100  # a target that takes no part in the loss (the PyTorch and Hugging Face convention)
SDPA_CHOICES = ("auto", "cudnn", "flash", "efficient", "math")  # attention kernel preference on a GPU
CHUNK_TOKENS = 2048  # tokens per chunk of the LM head + loss: [2048, 32000] fp32 logits are 250 MiB


@dataclass
class ModelSection:
    preset: str = "tiny"  # shape when training from scratch (see moecpt.model.config.PRESETS)
    overrides: dict[str, Any] = field(default_factory=dict)  # MixtralConfig fields, e.g. num_hidden_layers
    intra_doc_attention: bool = False  # tokens attend only within their document in packed samples


@dataclass
class DataSection:
    # Weighted corpora, Megatron style: "0.644 ja 0.256 en 0.1 code", where each name is a key of `corpora`
    # or a token shard prefix.
    mixture: str = ""
    # name -> JSON Lines files or globs (tokenized into `cache_dir` on first use) or one shard prefix.
    corpora: dict[str, list[str]] = field(default_factory=dict)
    tokenizer: str = ""  # SentencePiece .model / tokenizer.json / directory; "" = the Mixtral tokenizer
    cache_dir: str = "cache/shards"
    seq_len: int = 2048
    seed: int = 1234
    allow_repeat: bool = True  # a corpus that runs out starts a new, reshuffled epoch (logged and counted)
    valid_fraction: float = 0.01
    valid_max_documents: int = 200
    # Start this mixture afresh at the resumed sample count instead of refusing a changed data stream.
    new_stage: bool = False
    # Later mixtures, each from its optimizer step on ([[data.stages]]: start_step, mixture); `mixture` above
    # is the first stage's. Each corpus continues its own pass across stages (docs/cpt.md, "Stages").
    stages: list[DataStage] = field(default_factory=list)

    def check_stages(self, steps: int) -> None:
        """Stage boundaries rise, lie inside the run, and every stage's mixture names known corpora."""
        last = 0
        for i, stage in enumerate(self.stages):
            key = f"data.stages[{i}]"
            if not last < stage.start_step < steps:
                after = f"the previous stage's start_step ({last})" if i else "0"
                raise UserError(f"config: {key}.start_step = {stage.start_step} must be above {after} and below "
                                f"training.steps ({steps}); list the stages in the order they begin")
            if not stage.mixture.strip():
                raise UserError(f"config: {key}.mixture is empty; e.g. mixture = '0.9 ja 0.1 en'")
            check_mixture(stage.mixture, self.corpora, f"{key}.mixture")
            last = stage.start_step

    def check_corpora_listed(self) -> None:
        """Each data.corpora entry lists something (checked before training; a recipe may fill them in later)."""
        for name, files in self.corpora.items():
            if not files:
                raise UserError(f"config: data.corpora.{name} is empty; list its JSON Lines files or globs, or "
                                f"one shard prefix, e.g. --data.corpora.{name}='[\"corpus/{name}/*.jsonl\"]', "
                                f"or remove it")

    def check_sources(self) -> None:
        """Each mixture entry has a positive finite weight and names a data.corpora key, a shard prefix or a
        file (the mixture itself is parsed by moecpt.data)."""
        check_mixture(self.mixture, self.corpora, "data.mixture")


@dataclass
class DataStage:
    """A later data stage: from optimizer step `start_step` on, samples come from `mixture` (same syntax as
    data.mixture, names from data.corpora)."""

    start_step: int = 0
    mixture: str = ""


def check_mixture(mixture: str, corpora: dict[str, list[str]], key: str) -> None:
    """Each entry of a mixture string has a positive finite weight and names a data.corpora key, a shard
    prefix or a file (the mixture itself is parsed by moecpt.data)."""
    parts = mixture.split()
    if len(parts) < 2 or len(parts) % 2:
        return  # one prefix alone, or malformed: moecpt.data.mixture says what is wrong
    for weight, entry in zip(parts[::2], parts[1::2], strict=True):
        try:
            w = float(weight)
        except ValueError:
            raise UserError(f"config: {key}: weight {weight!r} of {entry!r} is not a number; write "
                            "weight and name pairs, e.g. '0.644 ja 0.256 en 0.1 code'") from None
        if not (math.isfinite(w) and w > 0):
            raise UserError(f"config: {key}: the weight of {entry!r} must be a positive finite number "
                            f"(got {weight}); e.g. '0.7 ja 0.3 en'")
        for src in entry.rpartition("=")[2].split(","):
            if src not in corpora and not _names_a_file(src):
                known = ", ".join(corpora) or "none"
                raise UserError(f"config: {key} names {src!r}, which is neither a key of "
                                f"[data.corpora] (keys: {known}) nor a shard prefix or file; add it under "
                                f"[data.corpora] ({src} = [\"path/to/*.jsonl\"]) or correct the name")


@dataclass
class OptimizerSection:
    lr: float = 2e-5
    min_lr: float = 2e-6
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # matrices only: never norms, biases or the router
    grad_clip: float = 1.0


SCHEDULE_KINDS = ("warmup_cosine", "wsd", "infinite", "constant")
DECAY_SHAPES = ("cosine", "linear", "1-sqrt")


@dataclass
class ScheduleSection:
    """The learning-rate schedule (moecpt.train.schedule; when to use which: docs/cpt.md)."""

    # warmup_cosine: warmup, then decay to min_lr over all the steps after it (Swallow-MX).
    # wsd: warmup, stable at lr, then decay to min_lr over the last decay_fraction of the steps.
    # infinite: warmup, cooldown to constant_lr over cooldown_steps, constant, then (anneal_steps > 0) a final
    #   anneal to min_lr over the last anneal_steps.
    # constant: warmup, then lr.
    kind: str = "warmup_cosine"
    warmup_steps: int = 1000
    # The shape of every decay: cosine | linear | 1-sqrt. ("constant" is the old spelling of kind = "constant".)
    decay: str = "cosine"
    decay_fraction: float = 0.2  # wsd
    cooldown_steps: int = 0  # infinite
    constant_lr: float = 0.0  # infinite: the plateau (between optimizer.min_lr and optimizer.lr)
    anneal_steps: int = 0  # infinite: 0 = no final anneal (the run ends on the plateau, ready to branch)
    # A cooldown branch: with init_from = a moecpt checkpoint, keep its optimizer state, step count and data
    # position, and decay from the LR its last step had to min_lr at training.steps (shape: decay).
    decay_only: bool = False

    def problems(self, steps: int, lr: float, min_lr: float) -> list[tuple[str, str]]:
        """(key, what is wrong) for each setting that does not fit the run's steps and learning rates."""
        out = []
        if self.kind not in SCHEDULE_KINDS:
            out.append(("schedule.kind", f"must be one of {', '.join(SCHEDULE_KINDS)}"))
        if self.decay == "constant" and self.kind != "warmup_cosine":
            out.append(("schedule.decay", "= 'constant' is the old spelling of schedule.kind = 'constant'; use "
                                          "that, with decay = cosine, linear or 1-sqrt"))
        elif self.decay not in (*DECAY_SHAPES, "constant"):
            out.append(("schedule.decay", f"must be one of {', '.join(DECAY_SHAPES)} (the shape of the decay)"))
        if self.warmup_steps < 0:
            out.append(("schedule.warmup_steps", "must be >= 0"))
        if self.kind == "wsd" and not 0 < self.decay_fraction <= 1:
            out.append(("schedule.decay_fraction", "must be above 0 and at most 1 (wsd decays over the last "
                                                   "decay_fraction of the steps; 0.1-0.2 is usual)"))
        if self.kind == "wsd" and self.warmup_steps + max(1, round(self.decay_fraction * steps)) > steps:
            out.append(("schedule.decay_fraction", f"leaves no room for the {self.warmup_steps} warmup steps in "
                                                   f"training.steps = {steps}; lower one of them"))
        if self.kind == "infinite":
            out += self._infinite_problems(steps, lr, min_lr)
        return out

    def _infinite_problems(self, steps: int, lr: float, min_lr: float) -> list[tuple[str, str]]:
        out = []
        if not min_lr <= self.constant_lr <= lr or self.constant_lr <= 0:
            out.append(("schedule.constant_lr", f"must be positive and between optimizer.min_lr ({min_lr:g}) and "
                                                f"optimizer.lr ({lr:g}), e.g. {lr / 2:g}"))
        if self.cooldown_steps < 0 or self.anneal_steps < 0:
            out.append(("schedule.cooldown_steps", "and schedule.anneal_steps must be >= 0"))
        elif self.warmup_steps + self.cooldown_steps + self.anneal_steps > steps:
            out.append(("schedule.cooldown_steps", f"+ warmup_steps + anneal_steps must fit in training.steps "
                                                   f"({steps})"))
        return out


@dataclass
class TrainingSection:
    steps: int = 25000
    global_batch: int = 1024  # sequences per optimizer step, over all ranks
    micro_batch: int = 1  # sequences per forward pass on one rank
    seed: int = 1234
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | float32 | bfloat16
    max_nonfinite_in_a_row: int = 5  # then save a checkpoint and stop
    spike_factor: float = 3.0  # flag a loss above this multiple of the median of the last 64 losses


@dataclass
class CheckpointSection:
    interval: int = 1000  # steps between checkpoints (0: only at the end and on a signal)
    keep_last: int = 2
    keep_every: int = 0  # also keep every k-th step's checkpoint (0: none)
    # After a non-finite step, finite steps in a row needed before a checkpoint is written again (none is
    # written during a non-finite streak either).
    recovery_steps: int = 10
    export_at_end: bool = True  # write a Hugging Face directory to RUN_DIR/hf when training ends
    # Write checkpoints in the background (DCP async_save): training stalls only while the state is copied to
    # host memory. The checkpoint becomes valid (records, COMPLETE, renamed) when the write has finished, at
    # the next save or the end of training, whichever comes first; a kill before that leaves the previous one.
    async_save: bool = False


@dataclass
class LoggingSection:
    interval: int = 10  # steps between console lines and metrics records
    val_interval: int = 0  # steps between validation passes (0: only at the end)
    val_batches: int = 8  # validation uses the first val_batches x micro_batch windows of each corpus
    progress: bool = True
    tensorboard: bool = False
    wandb_project: str = ""


@dataclass
class ParallelSection:
    """How training is distributed when launched with torchrun (see docs/distributed.md)."""

    # Ranks that split each MoE layer's experts (all-to-all dispatch); must divide the world size and the
    # number of experts. 1: every rank holds (its FSDP shard of) all experts.
    expert_parallel: int = 1
    # ZeRO-3: free each block's gathered weights after its forward and gather again in backward. false keeps
    # them from forward to backward (one all-gather less per block and step, more memory).
    reshard_after_forward: bool = True
    # With gradient accumulation, keep weights gathered and gradients unsharded until the last micro-batch
    # (one all-gather and reduce-scatter per step instead of per micro-batch; more memory).
    accumulate_unsharded: bool = False
    activation_checkpointing: bool = False  # recompute each decoder block in backward
    compile: bool = False  # torch.compile each decoder block
    backend: str = "auto"  # process-group backend: auto (nccl on GPU, gloo on CPU) | nccl | gloo
    timeout_s: int = 1800  # collective timeout before a stuck rank is reported


@dataclass
class KernelsSection:
    """Which kernels compute the step; every choice gives the same result up to rounding (docs/kernels.md)."""

    # Triton kernels for RMSNorm, RoPE, SwiGLU and the cross-entropy: auto (on a GPU when Triton is
    # installed) | on | off.
    triton: str = "auto"
    sdpa_backend: str = "auto"  # attention kernel preferred on a GPU: auto | cudnn | flash | efficient | math
    loss_chunk_tokens: int = CHUNK_TOKENS  # tokens per chunk of the LM head + loss (never all [tokens, vocab] logits)


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    # Weights to start from (a Hugging Face directory or a moecpt checkpoint directory), with a fresh
    # optimizer, schedule and data position: continual pre-training. "" = random initialisation.
    init_from: str = ""
    # "auto": continue from the latest complete checkpoint in run_dir if there is one; "never"; or a path.
    resume: str = "auto"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    kernels: KernelsSection = field(default_factory=KernelsSection)

    def validate(self) -> None:
        t, o = self.training, self.optimizer
        checks = [
            (t.steps > 0, "training.steps", "must be positive"),
            (t.micro_batch > 0, "training.micro_batch", "must be positive"),
            (t.global_batch > 0, "training.global_batch", "must be positive"),
            (t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:"), "training.device",
             "must be auto, cpu or cuda"),
            (t.dtype in ("auto", "float32", "bfloat16"), "training.dtype", "must be auto, float32 or bfloat16"),
            (math.isfinite(o.lr) and o.lr > 0, "optimizer.lr", "must be a positive finite number, e.g. 2e-5"),
            (0 <= o.min_lr <= o.lr, "optimizer.min_lr", "must be between 0 and optimizer.lr"),
            (o.grad_clip >= 0, "optimizer.grad_clip", "must be >= 0 (0 turns clipping off)"),
            (self.data.seq_len > 0, "data.seq_len", "must be positive"),
            (0 <= self.data.valid_fraction < 1, "data.valid_fraction",
             "must be at least 0 and below 1 (the share of each corpus's documents held out, e.g. 0.01)"),
            (bool(self.data.mixture.strip()), "data.mixture", "is empty; e.g. '0.644 ja 0.256 en 0.1 code'"),
            (self.checkpoint.interval >= 0, "checkpoint.interval", "must be >= 0"),
            (self.checkpoint.keep_last >= 1, "checkpoint.keep_last", "must be >= 1"),
            (self.checkpoint.keep_every >= 0, "checkpoint.keep_every",
             "must be >= 0 (0: keep no extra checkpoints; k: also keep every k-th step's)"),
            (self.checkpoint.recovery_steps >= 0, "checkpoint.recovery_steps", "must be >= 0"),
            (self.logging.interval > 0, "logging.interval", "must be positive"),
            (self.logging.val_interval >= 0, "logging.val_interval", "must be >= 0 (0: validate only at the end)"),
            (t.max_nonfinite_in_a_row >= 1, "training.max_nonfinite_in_a_row", "must be >= 1"),
            (self.parallel.expert_parallel >= 1, "parallel.expert_parallel", "must be >= 1"),
            (self.parallel.backend in ("auto", "nccl", "gloo"), "parallel.backend", "must be auto, nccl or gloo"),
            (self.parallel.timeout_s > 0, "parallel.timeout_s", "must be positive"),
            (self.kernels.triton in ("auto", "on", "off"), "kernels.triton", "must be auto, on or off"),
            (self.kernels.sdpa_backend in SDPA_CHOICES, "kernels.sdpa_backend",
             f"must be one of {', '.join(SDPA_CHOICES)}"),
            (self.kernels.loss_chunk_tokens > 0, "kernels.loss_chunk_tokens", "must be positive"),
        ]
        checks += [(False, key, what) for key, what in self.schedule.problems(t.steps, o.lr, o.min_lr)]
        if self.schedule.decay_only and not self.init_from:
            checks.append((False, "schedule.decay_only", "needs init_from = a checkpoint to branch from (e.g. "
                                                         "--init_from=RUN/checkpoints/step_00002000)"))
        for ok, key, what in checks:
            if not ok:
                raise UserError(f"config: {key} {what} (got {_get(self, key)!r})")
        self.data.check_sources()
        self.data.check_stages(t.steps)


def _names_a_file(src: str) -> bool:
    """Whether a mixture source that is no data.corpora key may be a shard prefix, file, directory or glob:
    one that exists, or any path-like name (one with a separator, a suffix or a wildcard: it may be made by an
    earlier step). Only a bare word that names nothing is taken for a missing data.corpora key."""
    return Path(f"{src}.bin").is_file() or Path(src).exists() or any(c in src for c in "/\\.*?[")


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


# ---- reading ---------------------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the field type `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except UserError:
                pass
        raise UserError(f"config: {key} = {value!r} is not a {tp}")
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"config: {key} must be a table, got {value!r}")
        _, vt = typing.get_args(tp)
        return {k: _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise UserError(f"config: {key} must be a list, got {value!r}")
        (it,) = typing.get_args(tp)
        return [_coerce(v, it, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):  # a table in an array of tables, e.g. [[data.stages]]
        if not isinstance(value, dict):
            raise UserError(f"config: {key} must be a table, got {value!r}")
        return dataclass_from_dict(tp, value, f"{key}.", "config")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is type(None) and value is None:
        return None
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise UserError(f"config: {key} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def dataclass_from_dict(cls: type, data: dict[str, Any], prefix: str, source: str) -> Any:
    """An instance of the dataclass `cls` from a TOML table, nested dataclasses from sub-tables. Keys are
    checked against the fields (an unknown key is an error naming `prefix` + key, with the closest known one)
    and values against the field types; errors name `source`."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known keys: {', '.join(fields)}"
            raise UserError(f"{source}: unknown key {dotted}{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise UserError(f"{source}: {dotted} must be a table ([{dotted}])")
            kwargs[key] = dataclass_from_dict(tp, value, f"{dotted}.", source)
        else:
            kwargs[key] = _coerce(value, tp, dotted)
    return cls(**kwargs)


def _parse_value(text: str) -> Any:
    """A command-line value as TOML (numbers, booleans, lists, quoted strings), or else as a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _merge(base: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = base
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise UserError(f"override --{dotted}: {p} is not a section")
    node[parts[-1]] = value


def read_toml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: invalid TOML: {e}") from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> None:
    """Apply `--section.key=value` strings to a TOML dict, in place."""
    for item in overrides:
        key, eq, text = item.removeprefix("--").partition("=")
        if not eq or not key:
            raise UserError(f"override {item!r}: write --section.key=value")
        _merge(data, key, _parse_value(text))


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a TOML file (or nothing: the defaults) and apply `section.key=value` overrides."""
    data = read_toml(path) if path is not None else {}
    apply_overrides(data, list(overrides))
    return config_from_dict(data, str(path) if path is not None else "defaults")


def config_from_dict(data: dict[str, Any], source: str) -> TrainConfig:
    """A checked `TrainConfig` from a dict of TOML tables; errors name `source` and the key."""
    config = dataclass_from_dict(TrainConfig, data, "", source)
    config.validate()
    return config


# ---- writing ---------------------------------------------------------------------------------------------
def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    if dataclasses.is_dataclass(v):
        return _toml_value(dataclasses.asdict(v))
    raise TypeError(f"cannot write {v!r} as TOML")


def _toml_key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else _toml_value(k)


def to_toml(config: TrainConfig) -> str:
    """The resolved configuration as TOML that `load_config` reads back to an equal config."""
    top, sections = [], []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            lines = [f"[{f.name}]"]
            lines += [f"{g.name} = {_toml_value(getattr(value, g.name))}" for g in dataclasses.fields(value)]
            sections.append("\n".join(lines))
        else:
            top.append(f"{f.name} = {_toml_value(value)}")
    return "\n".join(top) + "\n\n" + "\n\n".join(sections) + "\n"
