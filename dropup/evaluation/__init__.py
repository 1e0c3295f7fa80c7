"""Downstream evaluation with lm-evaluation-harness: the `LM` adapter over a model in memory (`adapter`), the
tasks a run scores (`tasks`), the corpus-built proxy task (`proxy`), and scoring during training (`scoring`).

lm-eval is an optional dependency: this module and `tasks` and `proxy` import it only when a run scores, so a
run without `eval.in_training` never loads it."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from tokenizers import Tokenizer

from dropup.config import ConfigError
from dropup.data.corpus import EOT
from dropup.evaluation import tasks
from dropup.evaluation.proxy import ProxySettings, build_proxy, task_name


def check_config(cfg: DictConfig) -> None:
    """eval.in_training's tasks, checked before any corpus work: an eval preset with tasks, names lm-eval knows,
    an include_path that exists (eval=proxy's tasks are generated from the prepared corpus, later)."""
    if not cfg.eval.get("in_training"):
        return
    if cfg.eval.kind == "none":
        raise ConfigError("eval.in_training=true scores downstream tasks, but eval=none names none: add eval=lm_eval "
                          "eval.tasks=[...], eval=paper or eval=proxy")
    if cfg.eval.kind == "proxy":
        return
    eval_cfg = OmegaConf.to_container(cfg.eval, resolve=True)
    specs = tasks.task_specs(eval_cfg)
    tasks.check_known(specs, tasks.task_manager(eval_cfg, [spec.name for spec in specs]))


def with_proxy_tasks(eval_cfg: dict, data_path: Path, domains) -> dict:
    """eval=proxy's settings made concrete for one prepared corpus: its generated task folder (built at first use)
    as the include_path, and one task per domain."""
    built = build_proxy(Path(data_path), list(domains), ProxySettings(**eval_cfg["proxy"]))
    return {**eval_cfg, "include_path": str(built), "tasks": [task_name(domain) for domain in domains]}


def scorer_for(cfg: DictConfig, data, seq_len: int):
    """The in-training scorer (`scoring.Scorer`) over the run's own tokenizer (`data`: its TokenData); None
    without eval.in_training."""
    if not cfg.eval.get("in_training"):
        return None
    from dropup.evaluation.scoring import Scorer  # lm-eval is optional: imported only by runs that score

    eval_cfg = OmegaConf.to_container(cfg.eval, resolve=True)
    if cfg.eval.kind == "proxy":
        eval_cfg = with_proxy_tasks(eval_cfg, data.path, data.domains)
    tokenizer_file = data.path / "tokenizer.json"
    eot = Tokenizer.from_file(str(tokenizer_file)).token_to_id(EOT)
    if eot is None:  # an HF seed's own tokenizer: its end-of-sequence token
        eot = json.loads((Path(cfg.seed_model) / "config.json").read_text()).get("eos_token_id")
    return Scorer(eval_cfg, tokenizer_file, seq_len, int(eot or 0))
