"""Dense models that MoE inits start from (docs/design.md, contract 3).

`seed_model=auto`: the dense seed is the run in `paths.seed_store/<key>` whose key hashes its configuration (model,
data, the `seed_recipe` training recipe and its random seed). If it is not there it is trained first, once, under
a file lock, so parallel sweep jobs wait for it instead of duplicating it. BTX's domain branches are found or made
the same way: the seed trained further on one domain each, for `seed_recipe.branch_tokens` x the MoE budget.
`seed_model=<dir>` names a dropup run directory or a Hugging Face directory of a supported family (dense; for
init=pretrained also its MoE family), whose config.json then is the architecture (`adopt_hf_seed`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf, open_dict
from safetensors.torch import load_file

from dropup.config import FEATURES, ConfigError, ModelConfig, MoEConfig
from dropup.data import DATA_STREAM_VERSION, preparation_identity
from dropup.ddp import external_launch
from dropup.flops import human_count, param_counts
from dropup.hf import from_hf, read_hf_config
from dropup.init import producer
from dropup.init.producer import InitialWeights, hf_reader, run_reader
from dropup.paths import project_path
from dropup.shards import CheckpointReader, scan_hf_dir

# what the seed's training saw: the prepared data plus how it was cut and mixed
DATA_USE = ("seq_len", "weights")


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _store(cfg: DictConfig) -> Path:
    return project_path(cfg.paths.seed_store)


# ModelConfig fields added after seed keys were first defined (the HF families' extensions): at their defaults
# they leave the key as it was, so a seed trained before they existed is still found
KEY_NEUTRAL_AT_DEFAULT = ("family", *FEATURES)


# how a step is executed, not what it computes (a dense model's gradient does not depend on them): not in the key
EXECUTION_ONLY = ("micro_batch_size", "activation_checkpointing")


# the seed trains in the run's trainer.precision; keyed only away from this default, at which seeds were first
# keyed (they stay found)
PRECISION_KEY_NEUTRAL = "bf16-mixed"


def seed_key(cfg: DictConfig) -> str:
    data = OmegaConf.to_container(cfg.data, resolve=True)
    model = OmegaConf.to_container(cfg.model, resolve=True)
    model.pop("name", None)
    defaults = ModelConfig()
    for field_name in KEY_NEUTRAL_AT_DEFAULT:
        if field_name in model and model[field_name] == getattr(defaults, field_name):
            del model[field_name]
    fields = {"model": model, "data": {**preparation_identity(data), **{k: data.get(k) for k in DATA_USE}},
              "recipe": {k: v for k, v in OmegaConf.to_container(cfg.seed_recipe.train, resolve=True).items()
                         if k not in EXECUTION_ONLY},
              "seed": int(cfg.seed_recipe.seed), "data_stream": DATA_STREAM_VERSION}
    precision = str(cfg.trainer.precision)
    if precision != PRECISION_KEY_NEUTRAL:
        fields["precision"] = precision
    return _hash(fields)


def seed_identity(cfg: DictConfig, strategy) -> str | None:
    """What a run's weights start from, for its resume key: the dense seed's store key (seed_model=auto), the
    seed_model path as given, or None for an init that reads no model."""
    if strategy.max_sources == 0:
        return None
    seed = cfg.get("seed_model")
    return f"auto:{seed_key(cfg)}" if seed in (None, "auto") else str(seed)


def _dense_cfg(cfg: DictConfig, run_dir: Path, train: dict, seed: int, init: dict, weights=None, seed_model=None):
    dense = OmegaConf.to_container(cfg, resolve=True)
    dense.update(stage="train", seed=seed, seed_model=seed_model, resume=True, run_dir=str(run_dir), train=train,
                 init=init)
    dense["moe"]["enabled"] = False
    # the seeds and branches are shared by many runs: the MoE run's downstream scoring is not theirs to pay for
    dense["eval"] = {**dense.get("eval", {}), "in_training": False}
    if weights is not None:
        dense["data"]["weights"] = weights
    return OmegaConf.create(dense)


def _find_or_train(run_dir: Path, make_cfg, names: dict, log, train_seed) -> Path:
    """The finished dense run in `run_dir`, trained first (under a lock: one trainer per seed) when missing by
    `train_seed(cfg, names, log)`, the trainer's own entry point, which the trainer hands in (the store is below it)."""
    done = lambda: (run_dir / "model.safetensors").is_file() and json.loads(  # noqa: E731
        (run_dir / "results.json").read_text()).get("status") == "completed"
    if run_dir.exists() and (run_dir / "results.json").exists() and done():
        return run_dir
    if external_launch():
        raise ConfigError(f"{names['what']} is not trained yet ({run_dir}), and a job whose ranks SLURM or torchrun "
                          "started cannot train it on the side: train it once in a single-task job (or with "
                          "trainer=ddp on one node), or pass seed_model=<its run directory>")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(run_dir) + ".lock"):
        if (run_dir / "results.json").exists() and done():
            return run_dir
        log(f"[seed] training {names['what']} into {run_dir}")
        cfg = make_cfg()
        train_seed(cfg, {"model": names["model"], "moe": "none", "init": names["init"]}, log)
    return run_dir


def seed_dir(cfg: DictConfig, train_seed, log=print) -> Path:
    run_dir = _store(cfg) / f"seed-{seed_key(cfg)}"
    train = {**OmegaConf.to_container(cfg.seed_recipe.train, resolve=True), "stream": "seed"}
    return _find_or_train(
        run_dir,
        lambda: _dense_cfg(cfg, run_dir, train, int(cfg.seed_recipe.seed), {"_target_": "dropup.init.scratch.Scratch"}),
        {"what": "the dense seed model", "model": cfg.model.name, "init": "scratch"}, log, train_seed,
    )


def branch_dirs(cfg: DictConfig, parent: Path, train_seed, log=print) -> list[Path]:
    """One dense branch per domain, each the seed trained further on that domain only (BTX)."""
    recipe = OmegaConf.to_container(cfg.seed_recipe.train, resolve=True)
    recipe.update(tokens=int(float(cfg.seed_recipe.branch_tokens) * int(cfg.train.tokens)), schedule_tokens=None)
    dirs = []
    for domain in cfg.data.domains:
        train = {**recipe, "stream": f"branch-{domain}"}
        key = _hash({'parent': parent.name, 'domain': domain, 'train': train, 'data_stream': DATA_STREAM_VERSION})
        run_dir = _store(cfg) / f"branch-{key}-{domain}"
        dirs.append(_find_or_train(
            run_dir,
            lambda rd=run_dir, d=domain, t=train: _dense_cfg(cfg, rd, t, int(cfg.seed_recipe.seed),
                                                    {"_target_": "dropup.init.pretrained.Pretrained"},
                                                    weights={d: 1.0}, seed_model=str(parent)),
            {"what": f"the BTX branch for domain {domain!r}", "model": cfg.model.name, "init": "pretrained"}, log,
            train_seed,
        ))
    return dirs


def load_run_state(run_dir: Path) -> dict[str, torch.Tensor]:
    path = Path(run_dir) / "model.safetensors"
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no model.safetensors: it is not a completed dropup run")
    return load_file(str(path))


def _hf_state(hf_dir: Path, model: ModelConfig) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory under our names, read through its index (`scan_hf_dir`): a stray
    consolidated copy or adapter file beside the shards is never merged in."""
    stored = scan_hf_dir(hf_dir)
    reader = CheckpointReader(stored)
    return from_hf({name: reader[name] for name in stored}, model.family, tied=model.tie_embeddings, model=model)


# what an architecture is (the rest, name and init_std, only labels or initializes it)
ARCHITECTURE_FIELDS = tuple(f for f in ModelConfig.__dataclass_fields__ if f not in ("name", "init_std"))


def hf_seed_dir(cfg: DictConfig) -> Path | None:
    """seed_model when it names a Hugging Face directory (one with config.json)."""
    seed = cfg.get("seed_model")
    if seed in (None, "auto"):
        return None
    where = Path(seed)
    if not where.exists():
        raise ConfigError(f"seed_model={seed} does not exist: name a dropup run directory or a Hugging Face "
                          "directory of a supported family")
    return where if (where / "config.json").is_file() else None


def adopt_hf_seed(cfg: DictConfig, explicit_model: bool) -> bool:
    """With seed_model=<HF dir> the architecture is the seed's config.json (model=hf). A model preset or model.*
    override the user gave explicitly must agree with it field by field: a silently different rope_theta or
    rms_norm_eps would no longer compute the checkpoint's function. Runs before any corpus or weight work.
    Returns whether `cfg.model` is now the seed's (model=hf, by hand or automatically)."""
    where = hf_seed_dir(cfg)
    if where is None:
        if cfg.model.name == "hf":
            raise ConfigError("model=hf reads the architecture from seed_model=<Hugging Face directory>: set it")
        return False
    _, found, _ = read_hf_config(where)
    if cfg.model.name == "hf" or not explicit_model:
        adopted = {**asdict(found), "init_std": float(cfg.model.init_std)}
        adopted["name"] = f"{found.family}-{human_count(param_counts(found)['total_params'])}"
        with open_dict(cfg):
            for key, value in adopted.items():
                cfg.model[key] = value
        return True
    wanted = ModelConfig(**OmegaConf.to_container(cfg.model, resolve=True))
    diff = [f"{f}={getattr(found, f)!r} (model={wanted.name} has {getattr(wanted, f)!r})"
            for f in ARCHITECTURE_FIELDS if getattr(found, f) != getattr(wanted, f)]
    if diff:
        raise ConfigError(f"seed_model={where} is a {found.family} model with {', '.join(diff)}: drop the model= / "
                          "model.* overrides (the seed's own config.json is then used: model=hf)")
    return False


def _check_same_architecture(found: ModelConfig, wanted: ModelConfig, where: Path) -> None:
    diff = [f"{f}={getattr(found, f)!r} (config has {getattr(wanted, f)!r})" for f in ARCHITECTURE_FIELDS
            if getattr(found, f) != getattr(wanted, f)]
    if diff:
        raise ConfigError(f"{where} does not match model={wanted.name}: {', '.join(diff)}; drop the model "
                          "overrides to use the seed's own config (model=hf)")


def _dense_hf_model(path: str | Path, model: ModelConfig) -> ModelConfig | None:
    """The checked architecture of a dense HF seed directory (None for a dropup run directory)."""
    where = Path(path)
    if not where.exists():
        raise ConfigError(f"seed_model={path} does not exist: name a dropup run directory or an HF directory")
    if not (where / "config.json").is_file():
        return None
    _, hf_model, hf_moe = read_hf_config(where)
    if hf_moe.enabled:
        raise ConfigError(f"seed_model={path} is an MoE model: upcycling needs a dense model; to continue "
                          "training it use init=pretrained")
    _check_same_architecture(hf_model, model, where)
    return hf_model


def load_dense(path: str | Path, model: ModelConfig) -> dict[str, torch.Tensor]:
    """A dense state dict from a dropup run directory or a Hugging Face directory of a supported family."""
    hf_model = _dense_hf_model(path, model)
    return load_run_state(Path(path)) if hf_model is None else _hf_state(Path(path), hf_model)


def open_dense(path: str | Path, model: ModelConfig) -> CheckpointReader:
    """`load_dense`, read lazily: the checkpoint's tensors under our names, each read when looked up."""
    hf_model = _dense_hf_model(path, model)
    return run_reader(Path(path)) if hf_model is None else hf_reader(Path(path), hf_model)


NEEDS_SEED_MODEL = "init=pretrained needs seed_model=<run dir or HF directory>"


def _pretrained_hf_model(path, model: ModelConfig, moe: MoEConfig | None) -> ModelConfig | None:
    """init=pretrained: the checked architecture of an HF seed directory (None for a dropup run directory)."""
    if path in (None, "auto"):
        raise ConfigError(NEEDS_SEED_MODEL)
    where = Path(path)
    if (where / "config.json").is_file():
        _, hf_model, hf_moe = read_hf_config(where)
        _check_same_architecture(hf_model, model, where)
        if hf_moe.enabled != (moe is not None):
            raise ConfigError(f"seed_model={path} is {'an MoE' if hf_moe.enabled else 'dense'} but moe= says "
                              f"{'MoE' if moe is not None else 'dense'}: set moe accordingly")
        if moe is not None and (hf_moe.num_experts, hf_moe.top_k) != (moe.num_experts, moe.top_k):
            raise ConfigError(f"seed_model={path} has {hf_moe.num_experts} experts, top-{hf_moe.top_k}: set "
                              f"moe.num_experts={hf_moe.num_experts} moe.top_k={hf_moe.top_k}")
        if moe is not None and hf_moe.shared_expert_d_ff != moe.shared_expert_d_ff:
            raise ConfigError(f"seed_model={path} has a shared expert of width {hf_moe.shared_expert_d_ff} (0: none) "
                              f"but this config one of {moe.shared_expert_d_ff}: set moe.shared_expert_d_ff="
                              f"{hf_moe.shared_expert_d_ff}")
        return hf_model
    return None


def load_pretrained(path, model: ModelConfig, moe: MoEConfig | None):
    """init=pretrained: the full state (dense or MoE) of a run directory or an HF directory (dense or MoE)."""
    hf_model = _pretrained_hf_model(path, model, moe)
    where = Path(path)
    return (load_run_state(where) if hf_model is None else _hf_state(where, hf_model)), str(where)


def dense_sources(cfg: DictConfig, strategy, log=print, train_seed=None) -> tuple[list[dict], str | list[str] | None]:
    """The dense state dicts `strategy` builds from, found or trained as needed (by `train_seed`, see
    `_find_or_train`), and where they came from."""
    if strategy.max_sources == 0:
        return [], None
    model = ModelConfig(**OmegaConf.to_container(cfg.model, resolve=True))
    if cfg.seed_model not in (None, "auto"):
        seed = Path(cfg.seed_model)
        state = load_dense(seed, model)
    else:
        seed = seed_dir(cfg, train_seed, log)
        state = load_run_state(seed)
    if strategy.max_sources == 1:  # one dense model; BTX also reads its domain branches
        return [state], str(seed)
    branches = branch_dirs(cfg, seed, train_seed, log)
    return [state] + [load_run_state(b) for b in branches], [str(seed)] + [str(b) for b in branches]


def source_dirs(cfg: DictConfig, strategy, log=print, train_seed=None) -> tuple[list[str], str | list[str] | None]:
    """The directories of the models a run starts from (`dense_sources`' seed and branches, found or trained as
    needed; init=pretrained's seed_model), and where they came from (the provenance's `seed_model`). Read nothing:
    under trainer=fsdp rank 0 resolves them and every rank reads its shards from them (`initial_weights`)."""
    if not strategy.builds_weights:
        if cfg.get("seed_model") in (None, "auto"):
            raise ConfigError(NEEDS_SEED_MODEL)
        return [str(cfg.seed_model)], str(Path(cfg.seed_model))
    if strategy.max_sources == 0:
        return [], None
    seed = Path(cfg.seed_model) if cfg.seed_model not in (None, "auto") else seed_dir(cfg, train_seed, log)
    if strategy.max_sources == 1:
        return [str(seed)], str(seed)
    dirs = [seed] + branch_dirs(cfg, seed, train_seed, log)
    return [str(d) for d in dirs], [str(d) for d in dirs]


def initial_weights(cfg: DictConfig, strategy, model: ModelConfig, moe: MoEConfig | None,
                    dirs: list[str]) -> InitialWeights:
    """The starting weights of a run as a per-tensor stream (`dropup.init.producer`) over the models in `dirs`
    (`source_dirs`), read lazily: what `initial_state` builds whole, bit for bit. Checks the sources against the
    config from their headers (a seed of other shapes, a truncated or missing file, an index naming a missing
    shard, a checkpoint of another model: one ConfigError each), before any tensor is read."""
    if not strategy.builds_weights:
        hf_model = _pretrained_hf_model(dirs[0], model, moe)
        reader = run_reader(Path(dirs[0])) if hf_model is None else hf_reader(Path(dirs[0]), hf_model)
        return producer.pretrained(reader, model, moe, dirs[0])
    if moe is None:
        if strategy.reads_dense:
            raise ConfigError(f"init={strategy.name} builds an MoE from dense models: for a dense run use init=scratch")
        return producer.dense_scratch(model, int(cfg.seed))
    sources = [open_dense(d, model) for d in dirs]
    return producer.built(strategy, sources, model, moe, int(cfg.seed))
