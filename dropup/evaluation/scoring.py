"""Downstream scores during training (`eval.in_training=true`): lm-eval's tasks on the training model itself.

`Scorer.score` runs `lm_eval.simple_evaluate` once per shot count over a `ModelLM` (`adapter.py`) that calls the
training model in eval mode, and returns `eval/<task>` for each task scored, `eval/avg` (their mean),
`eval/n_tasks` and `eval_s` (seconds spent). The run's recorder calls it at step 0, at every `eval.every`-th
validation point, and at the end.

Scoring must not change training: `simple_evaluate` seeds Python's, NumPy's and torch's generators, so the
generators' states are saved before and restored after (`rng_preserved`); the model's mode is restored, and its
forwards change no weights or buffers training reads (the routing counts are rewritten by every forward). A
failure inside a scoring is one logged line and empty cells: training goes on.
"""

from __future__ import annotations

import logging
import random
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from dropup.config import ConfigError
from dropup.evaluation.adapter import ModelLM
from dropup.evaluation.tasks import TaskSpec, average, check_known, loadable, run_tasks, task_manager, task_specs

log = logging.getLogger(__name__)


@contextmanager
def rng_preserved():
    """Python's, NumPy's and torch's (CPU and CUDA) generator states, restored on exit."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


class Scorer:
    """The tasks of `eval_cfg`, checked at construction (unknown names and a missing include_path are errors;
    tasks whose data do not load are left out with a warning), scored on demand."""

    def __init__(self, eval_cfg: dict, tokenizer_file: Path, seq_len: int, eot_id: int):
        self.cfg = dict(eval_cfg)
        self.every = int(self.cfg.get("every") or 1)
        if self.every < 1:
            raise ConfigError(f"eval.every={self.every}: score at every n-th validation point, n >= 1")
        specs = task_specs(self.cfg)
        self.manager = task_manager(self.cfg, [s.name for s in specs])
        check_known(specs, self.manager)
        self.specs: list[TaskSpec] = loadable(specs, self.manager)
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.seq_len, self.eot_id = int(seq_len), int(eot_id)

    @property
    def columns(self) -> list[str]:
        return [f"eval/{s.name}" for s in self.specs] + ["eval/avg", "eval/n_tasks", "eval_s"]

    def due(self, step: int, val_every: int, final: bool) -> bool:
        """Step 0, every `every`-th regular validation point (steps that are multiples of every x val_every, so a
        resumed run keeps the cadence), and the last step."""
        return final or step % (self.every * val_every) == 0

    def score(self, model: torch.nn.Module, forward_context, device) -> dict[str, float]:
        started = time.perf_counter()
        was_training = model.training
        model.eval()

        def forward(ids):
            with forward_context():
                return model(ids).logits

        lm = ModelLM(forward, self.tokenizer, self.seq_len, self.eot_id, device=device,
                     batch_size=int(self.cfg.get("batch_size") or 8),
                     max_gen_toks_cap=int(self.cfg.get("max_gen_toks") or 256))
        scores: dict[str, float] = {}
        try:
            with rng_preserved():
                scores = self._evaluate(lm)
        except Exception as err:  # noqa: BLE001 -- a failed scoring must not end the run
            log.warning("eval: scoring failed, its cells stay empty and training goes on (%s: %s)",
                        type(err).__name__, str(err).splitlines()[0][:200] if str(err) else "")
            scores = {}
        finally:
            model.train(was_training)
        scores = _as_on_rank_zero(scores)
        scores = average(scores)
        scores["eval_s"] = time.perf_counter() - started
        return scores

    def _evaluate(self, lm: ModelLM) -> dict[str, float]:
        return run_tasks(lm, self.specs, self.manager, self.cfg.get("limit"), bootstrap_iters=0)[0]


def _as_on_rank_zero(scores: dict[str, float]) -> dict[str, float]:
    """Every rank computed the same requests, but lm-eval hands the results only to the process whose LOCAL_RANK is
    0: the others take rank 0's scores (every rank calls this, whatever happened in its own scoring)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return scores
    box = [scores]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
