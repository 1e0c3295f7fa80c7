"""The typed run config composed from conf/: one dataclass per config group, registered as Hydra's `base_config`,
so a misspelt key or a wrong type fails at composition and names the key; `compose()` for code outside a Hydra
app; and what the user chose on the command line (`model_overridden`, `recipe_choices`).

The corpus-preparation defaults live here, as the schema's defaults, and `dropup.data` reads them: the config is
the one place a default is stated."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from hydra import compose as hydra_compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from dropup.config import ModelConfig, MoEConfig
from dropup.paths import CONF

# The BPE's sample: enough for a vocabulary of tens of thousands, under 1 GB of trainer memory on the bundled
# text; the bundled corpus (28 M training characters) is smaller, so its tokenizer sees all of it.
DEFAULT_TOKENIZER_SAMPLE_CHARS = 40_000_000
DEFAULT_CHUNK_CHARS = 4_000_000  # the unit of work a preparation worker takes
DEFAULT_SHARD_CHARS = 256_000_000  # about this many characters per token shard group


@dataclass
class DataSchema:
    name: str = "default"
    # packages (the bundled ja/en/code corpus) | jsonl | hf_disk | tokens (a prepared token folder)
    source: str = "packages"
    path: Any = None  # a path, a glob, or a list of them (jsonl)
    domains: list[str] = field(default_factory=lambda: ["ja", "en", "code"])
    # training mixture over domains; null = in proportion to each domain's size
    # (typed Any: omegaconf 2.3 cannot merge a command-line dict into an Optional[dict] that is None; the
    # loader checks the domains and values)
    weights: Any = None
    seq_len: int = 256
    vocab_size: int = 8192
    val_fraction: float = 0.05
    max_chars_per_domain: Optional[int] = None
    # preparation (dropup/data/prepare.py): BPE sample, worker processes (null: all cores), work and shard sizes
    tokenizer_sample_chars: Optional[int] = DEFAULT_TOKENIZER_SAMPLE_CHARS
    num_proc: Optional[int] = None
    chunk_chars: int = DEFAULT_CHUNK_CHARS
    shard_chars: int = DEFAULT_SHARD_CHARS


@dataclass
class TrainSchema:
    # the run stops after `tokens`; the lr schedule (warmup fraction, cosine, constant tail) spans `schedule_tokens`
    # (null: = tokens), so a run can stop mid-schedule and `resume=true train.tokens=<more>` continues it
    tokens: int = 2_000_000
    schedule_tokens: Optional[int] = None
    batch_size: int = 16  # sequences per optimizer step, over all ranks
    # sequences per forward/backward pass on each rank: the rank's share of batch_size is accumulated in
    # micro-batches of this many (null: all at once). pooled/per_layer balance losses are formed per micro-batch;
    # global_batch counts expert loads over the step's micro-batches so far (dropup.moe.load_balancing_loss).
    micro_batch_size: Optional[int] = None
    # per block, keep only its input and recompute its activations in the backward (less memory, ~1/3 more compute)
    activation_checkpointing: bool = False
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: Any = 0.05  # steps (int) or a fraction of the run (float)
    final_constant_steps: int = 0
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0
    log_every: int = 10
    val_every: int = 100
    val_tokens: int = 32768
    val_batch_size: int = 16
    ckpt_every: int = 100
    # extra validations at these token counts (the points artefacts read off a longer run's curve)
    eval_tokens: list[int] = field(default_factory=list)
    # which data stream the run reads (dropup.data.STREAMS); null: "moe" for an MoE, "dense" for a dense model
    stream: Optional[str] = None


@dataclass
class SeedRecipeSchema:
    """How the dense seed (and BTX's branches) are trained when seed_model=auto."""

    train: TrainSchema = field(default_factory=TrainSchema)
    seed: int = 0
    branch_tokens: float = 0.2  # each BTX branch: this x the MoE token budget (paper: 100B vs 500B)


@dataclass
class TrainerSchema:
    accelerator: str = "cpu"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "bf16-mixed"
    enable_progress_bar: bool = True


@dataclass
class LoggerSchema:
    kind: str = "csv"
    project: str = "dropup"
    mode: str = "offline"


@dataclass
class PathsSchema:
    root: str = "."
    data_dir: str = "data"
    seed_store: str = "artifacts/seeds"


@dataclass
class ExportSchema:
    run: Optional[str] = None  # the run directory to export / evaluate
    out: Optional[str] = None  # the Hugging Face directory to write (default: <run>/hf)


@dataclass
class ProxySchema:
    """eval=proxy's task (`dropup.evaluation.proxy`): per domain, `items` k-way continuation choices."""

    choices: int = 4
    items: int = 200
    context_tokens: int = 48
    continuation_tokens: int = 16


@dataclass
class EvalSchema:
    kind: str = "none"  # none | lm_eval | proxy
    tasks: list[Any] = field(default_factory=list)  # names, or {task: <name>, shots: <n>, metric: <name>}
    include_path: Optional[str] = None  # a folder of your own lm-eval task YAMLs
    num_fewshot: Optional[int] = None  # shots for tasks that do not name their own
    limit: Optional[int] = None
    batch_size: int = 8
    in_training: bool = False  # score the training model at step 0, every `every`-th validation and the end
    every: int = 1  # in validation points
    max_gen_toks: int = 256  # cap on tokens generated per request (no KV cache: each is a forward)
    proxy: ProxySchema = field(default_factory=ProxySchema)


@dataclass
class Config:
    """The typed top level: a misspelt key or a wrong type fails at composition, naming the key."""

    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    init: Any = None
    data: DataSchema = field(default_factory=DataSchema)
    train: TrainSchema = field(default_factory=TrainSchema)
    seed_recipe: SeedRecipeSchema = field(default_factory=SeedRecipeSchema)
    trainer: TrainerSchema = field(default_factory=TrainerSchema)
    logger: LoggerSchema = field(default_factory=LoggerSchema)
    paths: PathsSchema = field(default_factory=PathsSchema)
    export: ExportSchema = field(default_factory=ExportSchema)
    eval: EvalSchema = field(default_factory=EvalSchema)
    stage: str = "train"
    ratio: float = 0.5
    seed: int = 0
    seed_model: Optional[str] = "auto"
    resume: bool = False
    run_dir: Optional[str] = None  # set by tests and nested seed runs; normally Hydra's output directory


def register_configs() -> None:
    ConfigStore.instance().store(name="base_config", node=Config)


def compose(overrides) -> DictConfig:
    """The config `run.py <overrides>` composes, for code outside a Hydra app (the sweeps, the scaling plan,
    benchmarks, the data build)."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def model_overridden(overrides) -> bool:
    """Whether `overrides` name a model preset or a model.* field (then it must agree with an HF seed's config)."""
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
    return any(k == "model" or k.startswith("model.") for k in keys)



RECIPE_FIELDS = ("lr", "min_lr_ratio")  # what a run from an HF seed takes from the paper unless chosen


def recipe_choices(overrides) -> dict[str, str]:
    """Which of train.lr / train.min_lr_ratio the user chose, and where: on the command line (the field, or a
    train= preset), in an experiment preset, or in conf/local/default.yaml. The others are the train preset's
    defaults, which a run from a pretrained seed replaces (`dropup.train.PRETRAINED_RECIPE`)."""
    conf = CONF
    chosen: dict[str, str] = {}

    def sets(path: Path, name: str) -> bool:
        if not path.is_file():
            return False
        spec = yaml.safe_load(path.read_text()) or {}
        overrides_train = any(isinstance(d, dict) and any(str(k).endswith("/train") for k in d)
                              for d in spec.get("defaults", []))
        return overrides_train or (spec.get("train") or {}).get(name) is not None

    for override in overrides:
        key, _, value = override.partition("=")
        key = key.lstrip("+~")
        for name in RECIPE_FIELDS:
            if key == f"train.{name}":
                chosen[name] = f"{override} on the command line"
            elif key == "train":
                chosen.setdefault(name, f"train={value} on the command line")
            elif key == "experiment" and value not in ("", "null") and sets(conf / "experiment" / f"{value}.yaml", name):
                chosen.setdefault(name, f"experiment={value}")
    for name in RECIPE_FIELDS:
        if name not in chosen and sets(conf / "local" / "default.yaml", name):
            chosen[name] = "conf/local/default.yaml"
    return chosen
