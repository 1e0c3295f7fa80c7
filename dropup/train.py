"""`stage=train`: one run, from a composed config to a finished run directory (docs/design.md, contract 2).

The run directory holds `.hydra/` (Hydra's), `metrics.csv`, `results.json` (written as "running" first, replaced
atomically with "completed" or "failed"), `routing.json` for MoE runs, `model.safetensors` (final weights, our
naming) and `checkpoints/last.ckpt` for `resume=true` (a directory of per-rank shards under trainer=fsdp:
`dropup/fsdp.py`). Several ranks (trainer.devices > 1) are started by us on one node, or by SLURM / torchrun
(`dropup/ddp.py`); rank 0 alone writes the run's files.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from dropup import balancing, ddp, dense_seeds, evaluation, families, liveness, memory, moe, resume
from dropup.config import ConfigError, ModelConfig, MoEConfig, architecture
from dropup.cpu import prepare_cpu_process
from dropup.data import DATA_STREAM_VERSION, TokenData, prepared_data_dir, seed_tokenizer
from dropup.data.corpus import DataError
from dropup.files import write_json_atomic
from dropup.flops import param_counts, train_flops
from dropup.checkpoint_io import StreamingCheckpointIO
from dropup.fsdp import sharded_strategy, write_weights
from dropup.init import build_moe_state, dense_state, make_strategy
from dropup.init.producer import InitialWeights
from dropup.init.streaming import step0_ffn_error
from dropup.lit import LitLM, RunRecorder
from dropup.paths import git_sha, versions


def train_settings(cfg: DictConfig, world_size: int = 1) -> dict:
    """The resolved training recipe: steps from the token budget, the schedule's horizon in steps, the batch in
    sequences and the data stream."""
    train = OmegaConf.to_container(cfg.train, resolve=True)
    seq_len = int(cfg.data.seq_len)
    batch = int(train["batch_size"])
    if batch % world_size:
        raise ConfigError(f"train.batch_size={batch} is not divisible by the {world_size} devices")
    steps = int(train["tokens"]) // (batch * seq_len)
    if steps < 1:
        raise ConfigError(f"train.tokens={train['tokens']} is less than one batch ({batch} x {seq_len} tokens): "
                          "raise train.tokens or lower train.batch_size")
    schedule_tokens = int(train.get("schedule_tokens") or train["tokens"])
    schedule_steps = schedule_tokens // (batch * seq_len)
    if schedule_steps < steps:
        raise ConfigError(f"train.tokens={train['tokens']} runs past the schedule's end (train.schedule_tokens="
                          f"{schedule_tokens}): raise train.schedule_tokens or lower train.tokens")
    warmup = train["warmup_steps"]
    if isinstance(warmup, float):  # a fraction of the schedule
        warmup = max(1, int(warmup * schedule_steps))
    stream = train.get("stream") or ("moe" if cfg.moe.enabled else "dense")
    per_rank = batch // world_size
    micro = per_rank if train.get("micro_batch_size") is None else int(train["micro_batch_size"])
    if micro < 1 or per_rank % micro:
        raise ConfigError(f"train.micro_batch_size={micro} does not divide the {per_rank} sequences each of the "
                          f"{world_size} ranks takes per step (train.batch_size={batch}): choose a divisor of "
                          f"{per_rank}")
    return {**train, "seq_len": seq_len, "steps": steps, "schedule_tokens": schedule_tokens,
            "schedule_steps": schedule_steps, "warmup_steps": int(min(warmup, schedule_steps)), "stream": stream,
            "micro_batch_size": micro, "accumulate": per_rank // micro}


def load_data(cfg: DictConfig, seq_len: int, log) -> TokenData:
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    return TokenData(prepared_data_dir(cfg, log), data_cfg["domains"], seq_len, data_cfg.get("weights"))


def initial_state(cfg: DictConfig, strategy, model: ModelConfig, moe: MoEConfig | None, log) -> tuple[dict, dict]:
    """Weights to start from, and provenance of the dense models they came from."""
    if not strategy.builds_weights:  # init=pretrained: the model's own weights
        state, where = dense_seeds.load_pretrained(cfg.seed_model, model, moe)
        return state, {"seed_model": where}
    if moe is None:
        if strategy.reads_dense:
            raise ConfigError(f"init={strategy.name} builds an MoE from dense models: for a dense run use init=scratch")
        return dense_state(model, int(cfg.seed)), {"seed_model": None}
    sources, where = dense_seeds.dense_sources(cfg, strategy, log, train_seed=_train_dense_seed)
    state = build_moe_state(strategy, sources, model, moe, int(cfg.seed))
    provenance = {"seed_model": where}
    if len(sources) == 1:
        error = step0_ffn_error(strategy, sources, model, moe, int(cfg.seed), state=state)
        provenance["step0_ffn_error"] = error
        logging.getLogger(__name__).info(step0_message(strategy, moe, error))
    return state, provenance


def streamed_initial_weights(cfg: DictConfig, strategy, model: ModelConfig, moe: MoEConfig | None, log
                             ) -> tuple[InitialWeights, dict, list[str]]:
    """`initial_state` as a per-tensor stream over lazily read models, with the same provenance, and the
    directories it reads (`dense_seeds.source_dirs`: the dense seed and BTX's branches are trained here first if
    missing). The model is built on the meta device and written tensor by tensor from it (`dropup.init.producer`):
    under trainer=fsdp every rank is told the directories and writes only its shards; a single process never holds
    the whole initial state next to the model. Only `trainer=ddp`'s ranks still share `initial.safetensors`."""
    dirs, where = dense_seeds.source_dirs(cfg, strategy, log, train_seed=_train_dense_seed)
    weights = dense_seeds.initial_weights(cfg, strategy, model, moe, dirs)  # checked here, before any rank starts
    provenance = {"seed_model": where}
    if strategy.builds_weights and moe is not None and len(dirs) == 1:
        sources = [dense_seeds.open_dense(dirs[0], model)]
        error = step0_ffn_error(strategy, sources, model, moe, int(cfg.seed))  # builds layer 0's FFN only
        provenance["step0_ffn_error"] = error
        logging.getLogger(__name__).info(step0_message(strategy, moe, error))
    return weights, provenance, dirs


def step0_message(strategy, moe: MoEConfig, error: float) -> str:
    """One log line on what the upcycled MoE computes at step 0, measured on layer 0 (`step0_ffn_error`)."""
    measured = f"layer 0's MoE output differs from the dense FFN's by {error:.2g} (relative)"
    if moe.granularity > 1 and not strategy.uses_virtual_groups(moe):
        return (f"step 0: NOT the dense function: {measured}. Fine-grained experts (granularity {moe.granularity}) "
                "without virtual groups average the chosen parts instead of summing them; init.virtual_groups=auto "
                "makes naive upcycling exact")
    grouped = f" (virtual groups of {moe.granularity})" if moe.granularity > 1 else ""
    return f"step 0: {measured}{grouped}"


def _check_tokenizer_fits(cfg: DictConfig, model_cfg: ModelConfig) -> None:
    """An HF seed's tokenizer tokenizes the corpus: its vocabulary must fit the model's, checked before any corpus
    work (not after tokenizing it)."""
    path = seed_tokenizer(cfg.get("seed_model"))
    if path is not None:
        size = Tokenizer.from_file(str(path)).get_vocab_size()
        if size > model_cfg.vocab_size:
            raise ConfigError(f"the tokenizer of seed_model={cfg.seed_model} has {size} tokens but model.vocab_size="
                              f"{model_cfg.vocab_size}: use the seed's own config (model=hf)")


def _check_memory(cfg: DictConfig, model_cfg: ModelConfig, moe_cfg: MoEConfig | None, strategy, settings: dict) -> None:
    """A run whose predicted memory floor (`dropup.memory.predict`: training states, the activations any step
    keeps, the initialization's host memory) exceeds what this machine has free stops here, before any corpus
    work, with the setting to change (`memory.check_fits`)."""
    if not strategy.builds_weights:
        sources = 1  # init=pretrained: read tensor by tensor
    elif strategy.max_sources == 0 or moe_cfg is None:
        sources = 0
    else:
        sources = 1 if strategy.max_sources == 1 else 1 + len(cfg.data.domains)  # BTX: the seed and its branches
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    shape = memory.RunShape.of(trainer, settings, dense_sources=sources)
    problem = memory.check_fits(model_cfg, moe_cfg, shape, memory.available_memory(shape.on_gpu))
    if problem is not None:
        raise ConfigError(problem)


def _quiet_lightning() -> None:
    """Route Lightning's messages through the root logger only (Hydra's console and run log), once, without ads."""
    if logging.getLogger().handlers:
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            logger = logging.getLogger(name)
            logger.handlers.clear()
            # imported before Hydra configured logging (run.py imports the trainer at start), Lightning gave its
            # loggers their own console handler and stopped them propagating: without this its messages (the
            # ranks joining, ...) would reach neither Hydra's run log nor its console
            logger.propagate = True
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(getattr(f, "drops_ads", False) for f in rank_zero.filters):
        ads = lambda record: "litlogger" not in record.getMessage().lower()  # noqa: E731
        ads.drops_ads = True
        rank_zero.addFilter(ads)


def run_dir_of(cfg: DictConfig) -> Path:
    if cfg.get("run_dir"):
        return Path(cfg.run_dir)
    return Path(HydraConfig.get().runtime.output_dir)


# paper A.4: the MoE runs' peak lr and floor, the defaults for a run from a pretrained (Hugging Face) seed, whose
# weights the toy presets' peak (tuned for 3 M-parameter models trained from scratch) would wreck
PRETRAINED_RECIPE = {"lr": 2e-4, "min_lr_ratio": 0.1}


@dataclass
class RunPlan:
    """A run resolved from its config before any work: what `train` trains and what the sweep compares."""

    model: ModelConfig
    moe: MoEConfig | None
    strategy: object
    settings: dict
    key: dict  # the resume key (dropup.resume), without the data hashes
    lr_note: str  # where the peak lr came from, for the log


def plan_run(cfg: DictConfig, explicit_model: bool | None = None, recipe_from: dict | None = None) -> RunPlan:
    """Resolve `cfg` in place as a run would (an HF seed's architecture adopted, the pretrained-seed recipe
    applied), check it, and return the plan. Reads configs only, writes nothing. `recipe_from`: train.lr /
    train.min_lr_ratio the user chose, and where (`dropup.schema.recipe_choices`)."""
    adopted = dense_seeds.adopt_hf_seed(cfg, explicit_model=cfg.model.name != "hf" if explicit_model is None
                                  else explicit_model)
    lr_note = _apply_recipe_defaults(cfg, adopted, recipe_from)
    model_cfg, moe_cfg = architecture(cfg)
    strategy = make_strategy(cfg.init)  # validates the init's own settings before any work
    if moe_cfg is not None:
        strategy.check_moe(moe_cfg)
        # what its MoE family could not carry fails now, not at export after training
        families.family(model_cfg.family).check_moe_window(model_cfg)
    if moe_cfg is not None and balancing.mode(moe_cfg.lb_mode).router_bias \
            and str(cfg.trainer.precision).endswith("-true") \
            and not str(cfg.trainer.precision).startswith("32"):
        raise ConfigError(f"moe.lb_mode={moe_cfg.lb_mode} keeps a routing bias that trainer.precision={cfg.trainer.precision} "
                          "would store in half precision, rounding its small steps away: use bf16-mixed or 32-true")
    settings = train_settings(cfg, world_size=int(cfg.trainer.devices) * int(cfg.trainer.num_nodes))
    key = resume.resume_key(cfg, settings, strategy, model_cfg, moe_cfg, dense_seeds.seed_identity(cfg, strategy))
    return RunPlan(model_cfg, moe_cfg, strategy, settings, key, lr_note)


def _apply_recipe_defaults(cfg: DictConfig, adopted_hf_seed: bool, chosen: dict | None) -> str:
    """From a pretrained HF seed (model=hf), train.lr and train.min_lr_ratio default to `PRETRAINED_RECIPE`
    unless the user chose them (command line, a train= preset, an experiment preset). `chosen` None: the caller
    cannot tell (a config built in code), so the config is taken as it is. Returns the log line."""
    sources = {}
    for field, value in PRETRAINED_RECIPE.items():
        if chosen is None:
            sources[field] = "as configured"
        elif field in chosen:
            sources[field] = chosen[field]
        elif adopted_hf_seed:
            cfg.train[field] = value
            sources[field] = "model=hf: the paper's MoE recipe (A.4) for a pretrained seed"
        else:
            sources[field] = "the train preset"
    return (f"peak lr {float(cfg.train.lr):g} ({sources['lr']}), decaying to {float(cfg.train.min_lr_ratio):g} x "
            f"peak ({sources['min_lr_ratio']})")


def train(cfg: DictConfig, log=print, names: dict | None = None, explicit_model: bool | None = None,
          recipe_from: dict | None = None) -> dict:
    """Train one model as `cfg` says; returns the final results.json content. `names` are the config groups'
    option names to record (Hydra's choices for a top-level run). `explicit_model`: whether the user chose the
    model preset or fields (run.py knows from Hydra's overrides; by default, unless it is model=hf), which an HF
    seed's config must then agree with (`dense_seeds.adopt_hf_seed`). `recipe_from`: the train.lr / min_lr_ratio the
    user chose and where (`dropup.schema.recipe_choices`; run.py passes it), the others taking the defaults for
    a pretrained seed (`plan_run`); None takes the config as it is."""
    names = names or {}
    moe.announce_backends_again()  # each run's log names the MoE backend it runs (a multirun is one process)
    run_dir = run_dir_of(cfg)
    if not ddp.is_rank_zero():
        return _train_worker(cfg, run_dir)
    launch = ddp.external_launch()
    try:
        return _train_rank_zero(cfg, run_dir, log, names, explicit_model, recipe_from, launch)
    except BaseException as err:
        if launch and not ddp.announced(run_dir, launch):  # the other ranks wait to hear what to train: nothing
            ddp.announce(run_dir, launch, error=f"{type(err).__name__}: {err}")
        raise


def _train_rank_zero(cfg: DictConfig, run_dir: Path, log, names: dict, explicit_model: bool | None,
                     recipe_from: dict | None, launch: str | None) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    results_path = run_dir / "results.json"
    # a SLURM job that was requeued (preempted, timed out, `scontrol requeue`) continues from its checkpoint
    requeued = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0
    resume_run = bool(cfg.get("resume", False)) or requeued
    previous = json.loads(results_path.read_text()) if results_path.exists() else {}
    if previous and not resume_run:
        raise ConfigError(f"{run_dir} already holds a {liveness.state(previous, results_path)} run: pass resume=true "
                          "to continue it, or choose another run directory")
    writer = liveness.alive_elsewhere(previous) if not requeued else None
    if writer:
        raise ConfigError(f"{run_dir} is being trained right now ({writer}): wait for it, or stop that process first")
    plan = plan_run(cfg, explicit_model, recipe_from)
    model_cfg, moe_cfg, strategy, settings = plan.model, plan.moe, plan.strategy, plan.settings
    resume.check(previous, plan.key, run_dir)  # before anything is written
    logging.getLogger(__name__).info(plan.lr_note)
    _check_tokenizer_fits(cfg, model_cfg)
    _check_memory(cfg, model_cfg, moe_cfg, strategy, settings)
    evaluation.check_config(cfg)
    ratio = strategy.ratio_value  # None for inits without one (scratch, btx, pretrained)
    counts = param_counts(model_cfg, moe_cfg)
    tokens = settings["steps"] * settings["batch_size"] * settings["seq_len"]
    results = {
        "status": "running", "stage": "train", "model": names.get("model", model_cfg.name),
        "moe": names.get("moe", "none" if moe_cfg is None else "mixtral"),
        "shared_expert_d_ff": moe_cfg.shared_expert_d_ff if moe_cfg is not None else 0,
        "init": strategy.name, "ratio": ratio,
        "virtual_groups": bool(moe_cfg is not None and strategy.uses_virtual_groups(moe_cfg)),
        "lb_mode": moe_cfg.lb_mode if moe_cfg is not None else None, "seed": int(cfg.seed), "tokens": tokens, "steps": settings["steps"],
        "schedule_tokens": settings["schedule_tokens"],
        "train_flops": train_flops(model_cfg, moe_cfg, tokens, settings["seq_len"]), **counts,
        "metrics": {}, "routing": None,
        "provenance": {"git_sha": git_sha(), "versions": versions(), "corpus_hash": None, "tokenizer_hash": None,
                       "seed_model": None, "wall_time_s": None,
                       "data_stream": DATA_STREAM_VERSION, "stream": settings["stream"]},
        "resume_key": plan.key, "error": None,
    }
    heartbeat = liveness.Heartbeat(results_path)
    # a fresh run says "running" at once; a resumed one rewrites nothing until its data passed the key check too
    opened = not previous
    if opened:
        _open_run(heartbeat, results, run_dir, cfg)
    heartbeat.start()
    started = time.perf_counter()
    try:
        data = load_data(cfg, settings["seq_len"], log)
        if data.vocab_size > model_cfg.vocab_size:
            raise ConfigError(f"the tokenizer has {data.vocab_size} tokens but model.vocab_size="
                              f"{model_cfg.vocab_size}: raise model.vocab_size or data.vocab_size must match")
        results["resume_key"] = resume.with_data(plan.key, data.manifest)
        resume.check(previous, results["resume_key"], run_dir)
        results["provenance"].update(corpus_hash=data.manifest["corpus_hash"],
                                     tokenizer_hash=data.manifest["tokenizer_hash"])
        ckpt = last_checkpoint(run_dir)
        resuming = resume_run and ckpt.exists()
        if resuming:  # the checkpoint records its key too (results.json could have been replaced)
            resume.check({"resume_key": resume.checkpoint_key(ckpt)}, results["resume_key"], ckpt)
        if not opened:
            opened = True
            _open_run(heartbeat, results, run_dir, cfg)
        we_launch = ddp.needs_launch(int(cfg.trainer.devices), int(cfg.trainer.num_nodes))
        dirs = None  # trainer=fsdp: every rank builds its shards from these models (no initial.safetensors)
        if resuming:
            state, provenance = None, {"seed_model": None}
        elif _sharded(cfg) or not (we_launch or launch):  # no other rank needs the whole weights from a file
            state, provenance, dirs = streamed_initial_weights(cfg, strategy, model_cfg, moe_cfg, log)
        else:
            state, provenance = initial_state(cfg, strategy, model_cfg, moe_cfg, log)
        if resuming:
            provenance["seed_model"] = previous.get("provenance", {}).get("seed_model")
        results["provenance"].update(provenance)
        heartbeat.write(results)
        workers = []
        if (we_launch or launch) and isinstance(state, dict):  # every rank must start from these exact weights
            save_file({k: v.contiguous() for k, v in state.items()}, str(run_dir / "initial.safetensors"))
        told = {} if dirs is None else {INIT_SOURCES: dirs}  # what every rank reads its shards from
        if launch:
            ddp.announce(run_dir, launch, resume=resuming,
                         config={**OmegaConf.to_container(cfg, resolve=True), **told})
        if we_launch:
            workers = ddp.launch_workers(cfg, run_dir, int(cfg.trainer.devices), resume=resuming, extra=told)
        module, trainer, recorder = _fit(cfg, run_dir, model_cfg, moe_cfg, settings, data, state,
                                         ckpt if resuming else None, results["resume_key"], heartbeat)
        ddp.wait_workers(workers)
        results["metrics"] = dict(recorder.final)
        results["provenance"]["resumed_from_step"] = recorder.resumed_from
        results["routing"] = "routing.json" if (run_dir / "routing.json").exists() else None
        results["status"] = "completed"
    except (ConfigError, DataError) as err:
        results.update(status="failed", error=str(err))
        raise
    except BaseException as err:
        results.update(status="failed", error=f"{type(err).__name__}: {err}")
        if opened:
            (run_dir / "error.txt").write_text(traceback.format_exc())
        raise
    finally:
        heartbeat.stop()
        results["provenance"]["wall_time_s"] = round(time.perf_counter() - started, 2)
        if opened:  # a resume refused by its key leaves the run's files as they were
            heartbeat.write(results)
    return results


def _open_run(heartbeat, results: dict, run_dir: Path, cfg: DictConfig) -> None:
    heartbeat.write(results)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))  # resolved, for export and analysis


def _fit(cfg, run_dir, model_cfg, moe_cfg, settings, data, state, ckpt, key=None, heartbeat=None):
    _quiet_lightning()
    if cfg.trainer.get("accelerator") == "cpu":
        prepare_cpu_process(cfg.trainer.precision)
    module = LitLM(model_cfg, moe_cfg, settings, data, int(cfg.seed), state, resume_key=key, sharded=_sharded(cfg))
    recorder = RunRecorder(run_dir, data.domains, moe_cfg is not None, settings,
                           on_eval=lambda s, m, r: _save_routing(run_dir, s, r, module.last_similarity),
                           on_log=heartbeat.beat if heartbeat is not None else None,
                           scorer=evaluation.scorer_for(cfg, data, settings["seq_len"]))
    # checkpoints written straight to their file and read memory-mapped (the sharded strategy writes DCP instead)
    plugins = [ddp.cluster_environment(), StreamingCheckpointIO()]
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    if trainer_kwargs["strategy"] == "fsdp":
        trainer_kwargs["strategy"] = sharded_strategy(int(cfg.trainer.devices), int(cfg.trainer.num_nodes))
    trainer = L.Trainer(
        **trainer_kwargs, plugins=plugins,
        max_steps=settings["steps"], accumulate_grad_batches=settings["accumulate"],
        gradient_clip_val=settings["grad_clip"], logger=_loggers(cfg, run_dir),
        callbacks=[recorder, ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True, save_top_k=0,
                                             every_n_train_steps=settings["ckpt_every"])]
        + ([RichProgressBar()] if cfg.trainer.enable_progress_bar else []),
        default_root_dir=run_dir, num_sanity_val_steps=0, limit_val_batches=0, enable_model_summary=False,
        log_every_n_steps=settings["log_every"], deterministic=True,
    )
    torch.manual_seed(int(cfg.seed))
    trainer.fit(module, ckpt_path=str(ckpt) if ckpt else None)
    # a checkpoint at the last step, whatever ckpt_every: `resume=true train.tokens=<more>` extends the run from it
    trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    # the final weights, streamed one tensor at a time (under trainer=fsdp each is gathered: every rank takes part)
    write_weights(module.model, run_dir / "model.safetensors", write=trainer.is_global_zero)
    # Lightning leaves its process group up; a later run in this process (the MoE run after the dense seed it had
    # to train first, under trainer=ddp) would otherwise reuse it, with peers that have exited
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return module, trainer, recorder


INIT_SOURCES = "init_sources"  # the key of a worker's config naming the models rank 0 resolved (trainer=fsdp)


def _sharded(cfg: DictConfig) -> bool:
    """trainer=fsdp: no rank holds the whole model (built on meta, each rank writing its shards)."""
    return cfg.trainer.get("strategy") == "fsdp"


def last_checkpoint(run_dir: Path) -> Path:
    """The checkpoint to resume from: `last.ckpt`, or the previous sharded one if a job died while replacing it."""
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    old = ckpt.with_name(ckpt.name + ".old")
    return old if not ckpt.exists() and old.exists() else ckpt


def _train_worker(cfg: DictConfig, run_dir: Path) -> dict:
    """Ranks other than 0: the same model, data and steps; rank 0 alone writes the run's files."""
    launch = ddp.external_launch()
    resume = ddp.await_announcement(run_dir, launch) if launch else bool(cfg.get("resume"))
    if launch:  # every rank trains rank 0's resolved config (an HF seed adopted, the recipe's defaults applied)
        cfg = OmegaConf.create(ddp.announced_config(run_dir, launch))
    model_cfg, moe_cfg = architecture(cfg)
    settings = train_settings(cfg, world_size=int(cfg.trainer.devices) * int(cfg.trainer.num_nodes))
    data = load_data(cfg, settings["seq_len"], log=lambda *_: None)
    if resume:  # rank 0 decided: continue from the checkpoint it found
        _fit(cfg, run_dir, model_cfg, moe_cfg, settings, data, None, last_checkpoint(run_dir))
    elif cfg.get(INIT_SOURCES) is not None:  # trainer=fsdp: this rank's shards, from the models rank 0 named
        weights = dense_seeds.initial_weights(cfg, make_strategy(cfg.init), model_cfg, moe_cfg,
                                              list(cfg[INIT_SOURCES]))
        _fit(cfg, run_dir, model_cfg, moe_cfg, settings, data, weights, None)
    else:
        _fit(cfg, run_dir, model_cfg, moe_cfg, settings, data, load_file(str(run_dir / "initial.safetensors")), None)
    return {}


def _train_dense_seed(cfg: DictConfig, names: dict, log) -> None:
    """How the dense-seed store trains a seed (or a BTX branch) it lacks: a run of its own, in this process."""
    train(cfg, log=log, names=names)


def _save_routing(run_dir: Path, step: int, routing, similarity: list[float] | None = None) -> None:
    if routing is not None:
        write_json_atomic(run_dir / "routing.json", {"step": step, "tokens_per_expert": routing,
                                                     "layout": "domain -> layer -> expert",
                                                     "expert_similarity": similarity})


def _loggers(cfg: DictConfig, run_dir: Path):
    kind = cfg.logger.get("kind", "csv")
    if kind == "csv":
        return False  # metrics.csv is written by RunRecorder; Lightning's own loggers would nest version folders
    if kind == "wandb":
        os.environ.setdefault("WANDB_MODE", cfg.logger.get("mode", "offline"))
        from lightning.pytorch.loggers import WandbLogger

        return WandbLogger(project=cfg.logger.project, save_dir=str(run_dir), name=run_dir.name,
                           config=OmegaConf.to_container(cfg, resolve=True), offline=cfg.logger.mode != "online")
    raise ConfigError(f"logger.kind={kind!r} is unknown; use csv or wandb")


if __name__ == "__main__":  # a rank that dropup.ddp.launch_workers started: train its saved config
    train(OmegaConf.load(sys.argv[1]), log=lambda *_: None)
