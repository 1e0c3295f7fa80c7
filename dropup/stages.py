"""What `run.py` does for each `stage=`: the functions tests call directly with a composed config. The typed
config itself is `dropup.schema`."""

from __future__ import annotations

import json
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from dropup import dense_seeds, export as exporting, train as training
from dropup.config import ConfigError, architecture
from dropup.data.corpus import DataError
from dropup.data.sources import SourceError
from dropup.flops import param_counts, train_flops
from dropup.init import make_strategy
from dropup.paths import project_path
from dropup.schema import model_overridden, recipe_choices

STAGES = ("info", "train", "export", "eval")


def _choice(group: str, default: str) -> str:
    return HydraConfig.get().runtime.choices.get(group, default) if HydraConfig.initialized() else default


def _model_overridden() -> bool:
    return model_overridden(HydraConfig.get().overrides.task) if HydraConfig.initialized() else True


def _model_name(cfg: DictConfig) -> str:
    return cfg.model.name if dense_seeds.hf_seed_dir(cfg) is not None else _choice("model", cfg.model.name)


def info(cfg: DictConfig) -> dict:
    """docs/design.md, contract 1: total/active parameters and training FLOPs, counted from the config alone."""
    dense_seeds.adopt_hf_seed(cfg, explicit_model=_model_overridden())
    model, moe = architecture(cfg)
    report = {
        "model": _model_name(cfg),
        "moe": _choice("moe", "mixtral" if moe else "none"),
        **param_counts(model, moe),
        "features": model.features(),  # what the counts include beyond the paper's Llama (post-norms, q/k norms, ...)
        "tokens": int(cfg.train.tokens),
        "seq_len": int(cfg.data.seq_len),
        "schedule_tokens": int(cfg.train.schedule_tokens or cfg.train.tokens),
        "train_flops": train_flops(model, moe, int(cfg.train.tokens), int(cfg.data.seq_len)),
    }
    if moe is not None and make_strategy(cfg.init).upcycles:
        # an upcycled run's cost includes the dense seed it starts from (Table 2 lists the seed's own row)
        seed_train = cfg.seed_recipe.train
        report.update(seed_tokens=int(seed_train.tokens),
                      seed_schedule_tokens=int(seed_train.schedule_tokens or seed_train.tokens),
                      seed_train_flops=train_flops(model, None, int(seed_train.tokens), int(cfg.data.seq_len)))
    print(json.dumps(report))
    return report


def train(cfg: DictConfig) -> dict:
    # an HF seed's architecture is named by the run once adopted (family-size), not by the model preset
    groups = ("moe", "init") if dense_seeds.hf_seed_dir(cfg) is not None else ("model", "moe", "init")
    names = {g: _choice(g, "") for g in groups}
    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    return training.train(cfg, names={k: v for k, v in names.items() if v}, explicit_model=_model_overridden(),
                     recipe_from=recipe_choices(overrides))


def _export_paths(cfg: DictConfig):
    if not cfg.export.run:
        raise ConfigError(f"stage={cfg.stage} needs export.run=<run directory>")
    run_dir = project_path(cfg.export.run)
    return run_dir, (project_path(cfg.export.out) if cfg.export.out else Path(run_dir) / "hf")


def export(cfg: DictConfig):
    run_dir, out = _export_paths(cfg)
    path = exporting.export(run_dir, out, project_path(cfg.paths.data_dir))
    print(json.dumps({"exported": str(path)}))
    return path


def evaluate(cfg: DictConfig):
    if cfg.eval.kind not in ("lm_eval", "proxy"):
        raise ConfigError("stage=eval needs eval=lm_eval (with eval.tasks), eval=paper or eval=proxy")
    run_dir, out = _export_paths(cfg)
    eval_cfg = OmegaConf.to_container(cfg.eval, resolve=True)
    if cfg.eval.kind == "proxy":  # the proxy of the corpus the run trained on, with its tokenizer
        from dropup.evaluation import with_proxy_tasks

        data_dir = project_path(cfg.paths.data_dir)
        tokenizer_file = exporting.tokenizer_file(run_dir, data_dir)
        if tokenizer_file is None:
            raise ConfigError(f"eval=proxy is built from the corpus {run_dir} trained on, which is not in {data_dir}: "
                              "set paths.data_dir to where its data is")
        domains = exporting.run_config(run_dir).data.domains
        eval_cfg = with_proxy_tasks(eval_cfg, tokenizer_file.parent, domains)
    if not (out / "config.json").is_file():
        export(cfg)
    scores = exporting.evaluate(run_dir, out, eval_cfg)
    print(json.dumps(scores))
    return scores


def run(cfg: DictConfig):
    try:
        if cfg.stage not in STAGES:
            raise ConfigError(f"stage={cfg.stage!r} is not available; choose one of {STAGES}")
        return {"info": info, "train": train, "export": export, "eval": evaluate}[cfg.stage](cfg)
    except (ConfigError, DataError, SourceError) as err:
        raise SystemExit(f"error: {err}") from None
