"""Which lm-eval tasks a run scores, with how many shots and by which metric, checked before any training.

`eval.tasks` entries are a task name (scored with `eval.num_fewshot` shots, by the task's first metric) or a
mapping `{task: <name>, shots: <n>, metric: <name>}` (`eval=paper` names each task's shots and metric, as the
paper's Appendix B.2 does). A name lm-eval does not know (with `eval.include_path`'s own YAMLs) is a ConfigError at
start; so is an `include_path` that does not exist.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import groupby

from dropup.config import ConfigError
from dropup.paths import project_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    shots: int | None = None  # None: the task's own default
    metric: str | None = None  # None: the first metric lm-eval reports for it


def task_specs(eval_cfg: Mapping) -> list[TaskSpec]:
    """The tasks of `eval_cfg` (its `tasks` list) as specs; one error line for an empty list or a bad entry."""
    entries = list(eval_cfg.get("tasks") or [])
    if not entries:
        raise ConfigError("eval.tasks is empty: name lm-eval tasks, e.g. eval.tasks=[hellaswag], or use eval=paper")
    default = eval_cfg.get("num_fewshot")
    specs = []
    for entry in entries:
        if isinstance(entry, str):
            specs.append(TaskSpec(entry, default))
        elif isinstance(entry, Mapping) and "task" in entry and set(entry) <= {"task", "shots", "metric"}:
            shots = entry.get("shots", default)
            specs.append(TaskSpec(str(entry["task"]), None if shots is None else int(shots), entry.get("metric")))
        else:
            raise ConfigError(f"eval.tasks entry {dict(entry) if isinstance(entry, Mapping) else entry!r} is neither "
                              "a task name nor {task: <name>, shots: <n>, metric: <name>}")
    return specs


def task_manager(eval_cfg: Mapping, names: Iterable[str] = ()):
    """lm-eval's TaskManager over `eval.include_path` (which must exist) and, unless every one of `names` is found
    there, lm-eval's own tasks too (indexing those takes seconds: one index per include_path, kept for the process)."""
    include = eval_cfg.get("include_path")
    include = project_path(include) if include is not None else None  # relative: to the project root
    if include is not None and not include.is_dir():
        raise ConfigError(f"eval.include_path={include} is not a directory: point it at a folder of lm-eval task "
                          "YAMLs, or leave it unset")
    include = str(include.resolve()) if include is not None else None
    if include is not None:
        own = _manager(include, False)
        if set(names) <= set(own.all_tasks):
            return own
    return _manager(include, True)


@functools.cache
def _manager(include: str | None, defaults: bool):
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ConfigError("eval=lm_eval needs lm-evaluation-harness: pip install lm-eval") from err
    return TaskManager(include_path=include, include_defaults=defaults)


def check_known(specs: Iterable[TaskSpec], manager) -> None:
    known = set(manager.all_tasks)
    for spec in specs:
        if spec.name not in known:
            raise ConfigError(f"eval.tasks names {spec.name!r}, which lm-eval does not know: check the spelling "
                              "(python -m lm_eval ls tasks), or set eval.include_path to the folder of its YAML")


def loadable(specs: list[TaskSpec], manager) -> list[TaskSpec]:
    """The specs whose data and packages load; each one that does not is one warning line, and is left out."""
    from lm_eval.tasks import get_task_dict

    kept = []
    for spec in specs:
        try:
            get_task_dict([spec.name], manager)
        except Exception as err:  # noqa: BLE001 -- datasets, packages, network: any of them leaves the task out
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            log.warning("eval: task %s is left out: its data or packages did not load (%s)", spec.name, first[:200])
            continue
        kept.append(spec)
    return kept


def score_of(results: Mapping[str, Mapping], spec: TaskSpec) -> float | None:
    """The task's score in lm-eval's `results`: its named metric (under any filter) or its first numeric one."""
    metrics = results.get(spec.name)
    if not metrics:
        return None
    numeric = {k: v for k, v in metrics.items() if "," in k and "stderr" not in k and isinstance(v, (int, float))}
    if spec.metric is not None:
        numeric = {k: v for k, v in numeric.items() if k.split(",")[0] == spec.metric}
    return float(next(iter(numeric.values()))) if numeric else None


def run_tasks(model, specs: list[TaskSpec], manager, limit=None, **kwargs) -> tuple[dict[str, float], dict]:
    """`lm_eval.simple_evaluate` once per shot count: `eval/<task>` by each spec's metric, and lm-eval's raw
    results. `model` is an `LM` or the name lm-eval knows a model class by (with `model_args` in kwargs)."""
    import lm_eval

    scores: dict[str, float] = {}
    raw: dict = {}
    by_shots = groupby(sorted(specs, key=lambda s: (s.shots is None, s.shots or 0)), key=lambda s: s.shots)
    for shots, group in by_shots:
        group = list(group)
        result = lm_eval.simple_evaluate(model=model, tasks=[s.name for s in group], num_fewshot=shots, limit=limit,
                                         task_manager=manager, log_samples=False, verbosity="ERROR", **kwargs)
        if result is None:  # lm-eval returns results only in the process whose LOCAL_RANK is 0 (Scorer shares them)
            continue
        raw.update(result["results"])
        for spec in group:
            value = score_of(result["results"], spec)
            if value is not None:
                scores[f"eval/{spec.name}"] = value
    return scores, raw


def average(scores: dict[str, float]) -> dict[str, float]:
    """`eval/avg` (the mean over the tasks present) and `eval/n_tasks` beside each task's score."""
    present = [v for k, v in scores.items() if k.startswith("eval/") and k not in ("eval/avg", "eval/n_tasks")]
    if not present:
        return dict(scores)
    return {**scores, "eval/avg": sum(present) / len(present), "eval/n_tasks": len(present)}
