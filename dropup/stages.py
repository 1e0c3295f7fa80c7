"""What `run.py` does for each `stage=`: the functions tests call directly with a composed config."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from dropup.config import ConfigError, ModelConfig, MoEConfig
from dropup.flops import param_counts, train_flops

STAGES = ("info",)


@dataclass
class DataSchema:
    seq_len: int = 256
    domains: list[str] = field(default_factory=lambda: ["ja", "en", "code"])


@dataclass
class TrainSchema:
    tokens: int = 2_000_000


@dataclass
class Config:
    """The typed top level: a misspelt key or a wrong type fails at composition, naming the key."""

    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    init: Any = None
    data: DataSchema = field(default_factory=DataSchema)
    train: TrainSchema = field(default_factory=TrainSchema)
    stage: str = "info"
    ratio: float = 0.5
    seed: int = 0
    seed_model: str = "auto"


def register_configs() -> None:
    ConfigStore.instance().store(name="base_config", node=Config)


def architecture(cfg: DictConfig) -> tuple[ModelConfig, MoEConfig | None]:
    """Typed, validated model and MoE configs from a composed config (raises ConfigError)."""
    model = ModelConfig(**OmegaConf.to_container(cfg.model, resolve=True))
    moe = MoEConfig(**OmegaConf.to_container(cfg.moe, resolve=True))
    return model, (moe if moe.enabled else None)


def _choice(group: str, default: str) -> str:
    return HydraConfig.get().runtime.choices.get(group, default) if HydraConfig.initialized() else default


def info(cfg: DictConfig) -> dict:
    """Contract 1: total/active parameters and training FLOPs, counted from the config alone."""
    model, moe = architecture(cfg)
    report = {
        "model": _choice("model", model.name),
        "moe": _choice("moe", "mixtral" if moe else "none"),
        **param_counts(model, moe),
        "tokens": int(cfg.train.tokens),
        "seq_len": int(cfg.data.seq_len),
        "train_flops": train_flops(model, moe, int(cfg.train.tokens), int(cfg.data.seq_len)),
    }
    print(json.dumps(report))
    return report


def run(cfg: DictConfig):
    try:
        if cfg.stage not in STAGES:
            raise ConfigError(f"stage={cfg.stage!r} is not available; choose one of {STAGES}")
        return {"info": info}[cfg.stage](cfg)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
