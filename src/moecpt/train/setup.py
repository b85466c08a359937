"""The explicit steps before the training loop: the runtime (device, process group, precision, kernels), the
data (tokenized into the shard cache on first use) and the model (built, parallelised, initialised once).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moecpt.config import TrainConfig
from moecpt.data.indexed import shard_exists
from moecpt.data.mixture import MixtureDataset, parse_mixture, resolve_mixture
from moecpt.data.preprocess import cache_prefix, cached_shard
from moecpt.data.tokenizer import Tokenizer, load_tokenizer
from moecpt.errors import UserError
from moecpt.kernels.attention import sdpa_backend
from moecpt.kernels.support import triton_installed, triton_usable, why_not_triton
from moecpt.model import CausalLM, build_model, load_config, param_shapes
from moecpt.model.families import preset_config
from moecpt.parallel import dist as pdist
from moecpt.parallel import parallelize as par
from moecpt.train import checkpoint as ckpt_lib


@dataclass
class Runtime:
    """Where and how this process computes."""

    device: torch.device
    rank: int
    world: int
    amp_dtype: torch.dtype | None  # bf16 autocast with fp32 master weights, or None: plain fp32
    fused_kernels: bool  # the Triton kernels
    sdpa: str  # attention kernel preference
    owns_process_group: bool  # this process created the group and tears it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def compute(self) -> contextlib.ExitStack:
        """The context of every forward and backward: SDPA backend preference and autocast."""
        stack = contextlib.ExitStack()
        stack.enter_context(sdpa_backend(self.sdpa, self.device))
        stack.enter_context(torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                           enabled=self.amp_dtype is not None))
        return stack


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"training.device = {name!r} but no CUDA GPU is visible; use cpu or auto")
    return torch.device(name)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast (fp32 master weights) on GPU by default, plain fp32 on CPU."""
    if cfg.training.dtype == "bfloat16" or (cfg.training.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def use_triton(cfg: TrainConfig, device: torch.device) -> bool:
    """kernels.triton resolved: auto = on a GPU with Triton installed; on = wherever Triton can run, else an
    error that says why."""
    choice = cfg.kernels.triton
    if choice == "auto":
        return device.type == "cuda" and triton_installed()
    if choice == "on" and not triton_usable(device):
        raise UserError(f"config: kernels.triton = 'on' but {why_not_triton(device)}; "
                        "set kernels.triton = 'auto' or 'off'")
    return choice == "on"


def setup_runtime(cfg: TrainConfig) -> Runtime:
    """Device, process group (under torchrun, WORLD_SIZE > 1), precision and kernels; seeds this rank."""
    device = resolve_device(cfg.training.device)
    owns = pdist.init_distributed(device, cfg.parallel.backend, cfg.parallel.timeout_s)
    rt = Runtime(device, pdist.rank(), pdist.world_size(), autocast_dtype(cfg, device), use_triton(cfg, device),
                 cfg.kernels.sdpa_backend, owns)
    per_pass = cfg.training.micro_batch * rt.world
    if cfg.training.global_batch % per_pass:
        raise UserError(f"config: training.global_batch ({cfg.training.global_batch}) must be a multiple of "
                        f"training.micro_batch x world size ({cfg.training.micro_batch} x {rt.world} = {per_pass})")
    seed_everything(cfg.training.seed + rt.rank)
    return rt


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_data(cfg: TrainConfig, rt: Runtime) -> tuple[Tokenizer, MixtureDataset]:
    """The tokenizer and the mixture, each name resolved through `data.corpora`. JSON Lines sources are
    tokenized into the shared shard cache first: on several ranks, each its share (`tokenize_shared`), with
    no collective while it runs; then every rank reads the cache."""
    tokenizer = load_tokenizer(cfg.data.tokenizer or None)
    if rt.world > 1 and cfg.data.cache_dir:
        tokenize_shared(cfg, tokenizer.path, rt)
    entries = resolve_mixture(cfg.data.mixture, cfg.data.cache_dir, tokenizer=tokenizer.path,
                              sources=cfg.data.corpora)
    dataset = MixtureDataset(entries, seq_len=cfg.data.seq_len, seed=cfg.data.seed,
                             allow_repeat=cfg.data.allow_repeat, valid_fraction=cfg.data.valid_fraction,
                             valid_max_documents=cfg.data.valid_max_documents)
    return tokenizer, dataset


def raw_sources(cfg: TrainConfig) -> list[str]:
    """The sources of every data stage's mixture that are not shards yet (JSON Lines files, globs,
    directories), each once, in the config's order."""
    mixtures = [cfg.data.mixture, *(stage.mixture for stage in cfg.data.stages)]
    found = [src for mixture in mixtures for e in parse_mixture(mixture) for name in e.prefixes
             for src in cfg.data.corpora.get(name, [name]) if not shard_exists(src)]
    return list(dict.fromkeys(found))


def tokenize_shared(cfg: TrainConfig, tokenizer_path: str, rt: Runtime, poll_s: float = 0.5) -> list[Path]:
    """Tokenize the raw sources on all ranks at once, source i by rank i mod world (each into its cache
    shard, written under a temporary name and renamed when complete), then wait until every shard exists by
    polling the cache directory: no rank sits in a collective (whose timeout is `parallel.timeout_s`) while
    another tokenizes. A rank that fails ends the job (torchrun stops the others). Returns the shard prefixes.
    For a cluster, tokenize once beforehand instead: `moecpt data tokenize` (docs/distributed.md)."""
    prefixes = []
    for i, src in enumerate(raw_sources(cfg)):
        if i % rt.world == rt.rank:
            print(f"moecpt: rank {rt.rank} tokenizing {src} into {cfg.data.cache_dir}", file=sys.stderr, flush=True)
            prefixes.append(cached_shard([src], cfg.data.cache_dir, tokenizer=tokenizer_path))
        else:
            prefixes.append(cache_prefix([src], cfg.data.cache_dir, tokenizer=tokenizer_path))
    waited, last_note = 0.0, time.monotonic()
    while missing := [p for p in prefixes if not shard_exists(p)]:
        if time.monotonic() - last_note > 300:
            print(f"moecpt: rank {rt.rank} waiting {waited:.0f} s for {len(missing)} shard(s) other ranks "
                  f"are tokenizing, e.g. {missing[0]}", file=sys.stderr, flush=True)
            last_note = time.monotonic()
        time.sleep(poll_s)
        waited += poll_s
    return prefixes


def check_token_ids(tokenizer: Tokenizer, dataset: MixtureDataset, vocab_size: int) -> None:
    """Refuse, before training, token ids the model has no embedding row for: the tokenizer's (ids up to
    `tokenizer.vocab_size - 1`) and each shard's. More rows than the tokenizer has ids is normal (Qwen3: 151,936
    rows for 151,669 ids). A shard whose sidecar records a tokenizer of at most `vocab_size` ids is within
    bounds by construction; any other shard has its largest id read."""
    if tokenizer.vocab_size > vocab_size:
        raise UserError(f"the tokenizer {tokenizer.path} has token ids up to {tokenizer.vocab_size - 1} but the model "
                        f"has {vocab_size} embedding rows (model vocab_size); use the model's own tokenizer "
                        "(data.tokenizer) or a model whose vocab_size is at least the tokenizer's")
    for corpus in dataset.corpora:
        for shard in corpus.shards:
            recorded = shard.meta.get("tokenizer", {})
            if recorded.get("vocab_size") is not None and recorded["vocab_size"] <= vocab_size:
                continue
            chunk = 1 << 26
            top = max((int(shard.tokens[i:i + chunk].max()) for i in range(0, shard.num_tokens, chunk)), default=-1)
            if top >= vocab_size:
                made_with = f" (tokenized with {recorded['path']})" if recorded.get("path") else ""
                raise UserError(
                    f"corpus {corpus.name!r}: shard {shard.prefix}{made_with} holds token id {top}, but the model "
                    f"has {vocab_size} embedding rows (ids 0..{vocab_size - 1}). Re-tokenize it with the model's "
                    "tokenizer (moecpt data tokenize --tokenizer DIR, or set data.tokenizer for JSON Lines "
                    "sources), or use a model whose vocab_size exceeds the largest id")


def check_positions(cfg: TrainConfig, config) -> None:
    """Refuse samples longer than the positions the model was built for."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and cfg.data.seq_len > limit:
        raise UserError(f"config: data.seq_len ({cfg.data.seq_len}) is above the model's max_position_embeddings "
                        f"({limit}); lower data.seq_len to at most {limit}, or raise the model's positions with "
                        f"--model.overrides.max_position_embeddings={cfg.data.seq_len} (its RoPE then has to "
                        "extend that far)")


def shape_changes(old, new) -> list[str]:
    """The config fields that differ between two configs whose models have different parameter shapes
    (empty when the shapes are the same: coefficients and other settings may change between runs)."""
    if type(old) is not type(new):
        return [f"model family {old.model_type} in the checkpoint, {new.model_type} in the config"]
    if param_shapes(old) == param_shapes(new):
        return []
    return [f"{f.name} {getattr(old, f.name)} in the checkpoint, {getattr(new, f.name)} in the config"
            for f in dataclasses.fields(old)
            if getattr(old, f.name) != getattr(new, f.name)]


def model_config(cfg: TrainConfig):
    """The model's shape: from init_from's config (a Hugging Face directory or a moecpt checkpoint), or the
    preset with `model.overrides`."""
    overrides = dict(cfg.model.overrides)
    if not cfg.init_from:
        _check_overrides(preset_config(cfg.model.preset), overrides)
        return preset_config(cfg.model.preset, **overrides)
    src = Path(cfg.init_from)
    if ckpt_lib.is_hf_dir(src):
        base = load_config(src)
    elif (src / ckpt_lib.COMPLETE).is_file():
        base = ckpt_lib.saved_model_config(src)
    else:
        raise UserError(f"init_from = {cfg.init_from!r} is neither a Hugging Face directory (config.json) nor "
                        "a complete moecpt checkpoint")
    _check_overrides(base, overrides)
    config = dataclasses.replace(base, **overrides)
    if shape_changes(base, config):
        raise UserError(f"config: model.overrides {', '.join(f'{k}={v}' for k, v in overrides.items())} would "
                        f"change the shape of the init_from model ({src}); remove them")
    return config


def _check_overrides(base, overrides: dict) -> None:
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(base)})
    if unknown:
        raise UserError(f"config: unknown model.overrides key(s) {', '.join(unknown)}; use "
                        f"{type(base).__name__} fields such as num_hidden_layers, router_aux_loss_coef")


def build_training_model(cfg: TrainConfig, rt: Runtime, config, seed: int | None) -> CausalLM:
    """The model, parallelised as `[parallel]` says: built on the meta device, each rank materialising only
    its shards, initialised once (from `seed`, the same weights at any world size and layout; None: left
    for the checkpoint or init_from weights), with the kernels chosen once."""
    model = build_model(config)  # refuses a config of no known family
    par.parallelize(model, cfg.parallel, rt.device, rt.world, rt.amp_dtype if rt.world > 1 else None)
    model.to_empty(device=rt.device)
    model.tie_weights()
    if seed is not None:
        model.init_weights(torch.Generator().manual_seed(seed))  # buffers included
    else:
        model.init_buffers()  # weights come from the checkpoint or init_from; buffers may not
    model.use_kernels(rt.fused_kernels, cfg.kernels.loss_chunk_tokens, device=rt.device)
    if rt.world > 1 and config.router_balance_scope == "global":
        model.loss_fn.group = torch.distributed.group.WORLD  # every rank is a data-parallel rank
    return model
