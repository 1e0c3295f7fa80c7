"""The resume key: the settings that decide what a run computes, so that `resume=true` continues the same run.

A checkpoint restores the weights, the optimizer, the scheduler's step and the data position (batches are a
function of (stream, seed, step)), but not the settings they came from: `LambdaLR` does not save its lambda, a
restored optimizer keeps its old base lr, and results.json would be relabelled from the new config. So each run
records its key, a flat mapping from the setting's name (as typed on the command line) to its resolved value, in
results.json (where the sweep reads it) and in its checkpoint (`LitLM.on_save_checkpoint`), and a resume with any
of them changed is one error naming each setting, its recorded value and the new one, before anything is written.

In the key:
- the schedule and the optimizer: `train.batch_size`, `data.seq_len`, `train.schedule_tokens`, `train.lr`,
  `train.min_lr_ratio`, `train.warmup_steps` (in steps), `train.final_constant_steps`, `train.weight_decay`,
  `train.betas`, `train.eps`, `train.grad_clip`;
- the data: `seed`, `train.stream`, `data.domains`, `data.weights` and, once the data is loaded, the corpus and
  tokenizer hashes;
- the weights: `init` (the strategy) and its options (`init.ratio`, `init.index_mode`, ...), `seed_model` (the
  dense seed's store key, or the path it was given), and the architecture (`model.*`, `moe.*`).
Not in the key (how a step runs, or how far): `train.tokens` (a run may be extended on its schedule), the
number of ranks and nodes, `train.micro_batch_size`, `train.activation_checkpointing`, `moe.backend`,
`trainer.precision`, the validation, logging and checkpoint cadence, and the logger. (With seed_model=auto a
change of precision still names another dense seed, since the seed store keys on it: `seed_model` differs.)
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dropup.config import ConfigError, ModelConfig, MoEConfig
from dropup.init.registry import normalize_options

log = logging.getLogger(__name__)

SCHEDULE = ("batch_size", "schedule_tokens", "lr", "min_lr_ratio", "warmup_steps", "final_constant_steps",
            "weight_decay", "betas", "eps", "grad_clip", "stream")
EXECUTION_ONLY_MOE = ("backend",)  # the same function whichever kernel computes it


def resume_key(cfg: DictConfig, settings: dict, strategy, model: ModelConfig, moe: MoEConfig | None,
               seed_model: str | None) -> dict[str, Any]:
    """The key of a run from its resolved pieces (`dropup.train.plan_run`); the data hashes join it later
    (`with_data`). Values are JSON's, so a key read back from results.json compares equal."""
    key: dict[str, Any] = {f"train.{name}": settings[name] for name in SCHEDULE}
    key["data.seq_len"] = settings["seq_len"]
    key["seed"] = int(cfg.seed)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    key["data.domains"], key["data.weights"] = data["domains"], data.get("weights")
    key["init"] = strategy.name
    for option, value in OmegaConf.to_container(cfg.init, resolve=True).items():
        if option != "_target_":
            key[f"init.{option}"] = strategy.normalize(option, value)  # an alias as its name (index_mode)
    key["seed_model"] = seed_model
    key.update({f"model.{k}": v for k, v in asdict(model).items() if k != "name"})
    key["moe.enabled"] = moe is not None
    if moe is not None:
        key.update({f"moe.{k}": v for k, v in asdict(moe).items() if k not in EXECUTION_ONLY_MOE + ("enabled",)})
    return json.loads(json.dumps(key))


CHECKPOINT_FIELD = "dropup_resume_key"  # LitLM.on_save_checkpoint puts the key here


def checkpoint_key(ckpt: Path) -> dict | None:
    """The key a checkpoint of ours recorded (None before keys existed): a Lightning file, or the `meta.pt` of a
    sharded checkpoint directory. Memory-mapped: the weights are not read."""
    import torch

    path = ckpt / "meta.pt" if ckpt.is_dir() else ckpt
    return torch.load(path, map_location="cpu", mmap=not ckpt.is_dir(), weights_only=False).get(CHECKPOINT_FIELD)


def with_data(key: dict, manifest: dict) -> dict:
    """The key with the loaded corpus's identity."""
    return {**key, "data.corpus_hash": manifest.get("corpus_hash"), "data.tokenizer_hash": manifest.get("tokenizer_hash")}


def conflicts(recorded: dict, key: dict) -> list[tuple[str, Any, Any]]:
    """(setting, recorded, now) for every setting both keys hold with different values. A setting only one
    holds is not compared: a start that failed before loading its data recorded no corpus hash (and could
    checkpoint nothing)."""
    # a run recorded an option under an older spelling (init.index_mode=shared, now joint): compare the names
    recorded = normalize_options(recorded.get("init"), recorded, prefix="init.")
    return [(name, recorded[name], key[name]) for name in key if name in recorded and recorded[name] != key[name]]


def check(previous: dict, key: dict, run_dir: Path) -> None:
    """Refuse to resume the run whose results.json is `previous` with settings other than its key (one line).
    A results.json written before keys existed cannot be checked: one warning, and the run resumes."""
    if not previous:
        return
    recorded = previous.get("resume_key")
    if recorded is None and "status" not in previous:  # a checkpoint from before keys: results.json spoke for it
        return
    if recorded is None:
        log.warning("%s was started by an older dropup that recorded no resume key: its settings cannot be "
                    "checked against this config, resuming as configured", run_dir)
        return
    diffs = conflicts(recorded, key)
    if diffs:
        was = ", ".join(f"{name}={old!r}" for name, old, _ in diffs)
        now = ", ".join(f"{name}={new!r}" for name, _, new in diffs)
        raise ConfigError(f"resume=true: {run_dir} was trained with {was}, this config has {now}: pass the recorded "
                          "value(s) to continue it (other settings are a new run: use another run directory)")
