"""One LightningModule for dense and MoE language models, and the callbacks that write a run's records.

Batches are a function of the optimizer step (`TokenData.train_batch`), so the dataloader only ticks: resuming
from a checkpoint restores `global_step` and with it the exact data order. Validation runs on fixed windows of
each domain, at step 0 (before any update), every `train.val_every` steps and at the end.
"""

from __future__ import annotations

import csv
import itertools
import os
import signal
import math
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from dropup import balancing
from dropup.config import ModelConfig, MoEConfig
from dropup.data import TokenData
from dropup.fsdp import shard_model
from dropup.init.producer import InitialWeights, materialize_on_every_rank, on_meta
from dropup.model import Transformer
from dropup.moe.losses import StepLoads
from dropup.resume import CHECKPOINT_FIELD
from dropup.routing import summarize
from dropup.tensors import is_sharded


def lr_lambda(step: int, steps: int, warmup: int, min_ratio: float, final_constant: int = 0) -> float:
    """Linear warmup to the peak, cosine decay to `min_ratio` x peak, optionally held for the final steps.

    `steps` is the schedule's horizon (`train.schedule_tokens`), which a run may stop before (`train.tokens`)."""
    if step < warmup:
        return (step + 1) / warmup
    decay_steps = max(1, steps - warmup - final_constant)
    progress = min(1.0, (step - warmup) / decay_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class StepTicks(IterableDataset):
    def __iter__(self):
        return itertools.count()


class LitLM(L.LightningModule):
    """`initial_state`: the starting weights, a whole state dict (loaded here) or an `InitialWeights` stream, or
    None (a resumed run: the checkpoint's). `sharded` (trainer=fsdp): the model is built on the meta device and
    `configure_model` shards it, then writes each rank's shards from the stream (zeros to be overwritten by the
    checkpoint when resuming), so no rank ever holds the whole model."""

    def __init__(self, model_cfg: ModelConfig, moe_cfg: MoEConfig | None, train_cfg: dict, data: TokenData,
                 data_seed: int, initial_state: dict | InitialWeights | None = None, resume_key: dict | None = None,
                 sharded: bool = False):
        super().__init__()
        self.resume_key = resume_key  # written into every checkpoint (dropup.resume)
        # what configure_model writes into the model built on meta: a stream, or None for zeros (resuming)
        self._on_meta = isinstance(initial_state, InitialWeights) or (sharded and initial_state is None)
        self._initial = initial_state if self._on_meta else None
        if self._on_meta:
            with on_meta():
                self.model = Transformer(model_cfg, moe_cfg)
        else:
            self.model = Transformer(model_cfg, moe_cfg)
        if isinstance(initial_state, dict):
            self.model.load_state_dict(self.model.complete_state(initial_state), strict=True)
            # consumed: the caller's dict would otherwise keep a second copy of the weights alive all run long
            initial_state.clear()
        self.model.set_activation_checkpointing(bool(train_cfg.get("activation_checkpointing", False)))
        self.train_cfg, self.data, self.data_seed = train_cfg, data, data_seed
        self.completes_step = True  # whether the last training_step was its optimizer step's last micro-batch
        self._step_loads = StepLoads()  # global_batch balancing: expert loads over the step's micro-batches
        # aux_free: every optimizer step moves the routing bias against the step's loads, summed over its micro-batches
        self._routes_with_bias = moe_cfg is not None and balancing.mode(moe_cfg.lb_mode).router_bias
        self.last_losses: dict[str, float] = {}
        self.last_similarity: list[float] | None = None  # per layer, at the last validation (MoE)

    # --- training ---------------------------------------------------------------------------------------------
    def training_step(self, tick, batch_idx):
        """One micro-batch: rows [k * micro, (k + 1) * micro) of this rank's share of step `global_step`'s batch.
        Lightning accumulates `accumulate` of them (scaling each loss by 1 / accumulate) per optimizer step."""
        cfg = self.train_cfg
        world, rank = self.trainer.world_size, self.trainer.global_rank
        accumulate, micro = cfg["accumulate"], cfg["micro_batch_size"]
        k = self._micro_index()
        first = rank * (cfg["batch_size"] // world) + k * micro
        x, y = self.data.train_batch(self.global_step, cfg["batch_size"], self.data_seed, cfg["stream"],
                                     rows=slice(first, first + micro))
        if k == 0:
            self._step_loads.reset()
        losses = self.model.losses(self.model(x.to(self.device)), y.to(self.device), self._step_loads)
        # what the step reports: the mean over its micro-batches (equal sizes: the whole batch's mean lm_loss)
        shares = {name: value.detach() / accumulate for name, value in losses.items()}
        self.last_losses = shares if k == 0 else {n: self.last_losses[n] + v for n, v in shares.items()}
        if self._routes_with_bias:
            load_LE = self.model.tokens_per_expert().clone()
            self._step_load = load_LE if k == 0 else self._step_load + load_LE
        self.completes_step = k == accumulate - 1
        return losses["loss"]

    def _micro_index(self) -> int:
        """Which micro-batch of the current optimizer step this is. Counted, not taken from batch_idx: a resumed
        run restarts the tick stream, and checkpoints are only written between steps, so a step starts at 0."""
        if getattr(self, "_micro_step", None) != self.global_step:
            self._micro_step, self._micro_k = self.global_step, 0
        else:
            self._micro_k += 1
        return self._micro_k

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Resuming without FSDP, Lightning restores the weights before the optimizer exists: the module adopts
        the checkpoint's tensors (memory-mapped by `dropup.checkpoint_io`, copied on their first update) instead
        of copying them into its own, so the weights are held once, not twice."""
        return super().load_state_dict(state_dict, strict=strict, assign=assign or self.device_mesh is None)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.resume_key is not None:
            checkpoint[CHECKPOINT_FIELD] = self.resume_key

    def configure_model(self):
        """Under `trainer=fsdp` (Lightning's ModelParallelStrategy gives us a device mesh): shard the model, then
        write the starting weights into each rank's shards (`materialize`). Nothing is left on the meta device,
        so Lightning's own materialization (`to_empty` + `reset_parameters` of what is still on meta) finds
        nothing to overwrite."""
        if self.device_mesh is not None and not getattr(self, "_sharded", False):
            shard_model(self.model, self.device_mesh["data_parallel"], bf16=self.trainer.precision == "bf16-mixed")
            self._sharded = True
        if self._on_meta:
            weights, self._initial, self._on_meta = self._initial, None, False
            materialize_on_every_rank(self.model, weights, self.trainer.strategy.root_device)

    def optimizer_step(self, *args, **kwargs):
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)  # fp16's gradient scaler, if any
        scale = scaler.get_scale() if scaler is not None else None
        super().optimizer_step(*args, **kwargs)
        if self._routes_with_bias:
            # a scaler that found inf/NaN gradients skipped the update and lowered its scale: the step did not
            # happen, so neither does the bias step
            if scaler is not None and scaler.get_scale() < scale:
                return
            # inside the step, before on_train_batch_end (where ModelCheckpoint saves): its checkpoint holds the new bias
            load_LE = self.trainer.strategy.reduce(self._step_load.float(), reduce_op="sum")
            self.model.update_expert_bias(load_LE)

    def configure_optimizers(self):
        cfg = self.train_cfg
        # norm gains and biases are not decayed (the usual AdamW grouping; the paper's models have no biases)
        plain = lambda n: n.endswith("norm.weight") or n.endswith(".bias")  # noqa: E731
        decay = [p for n, p in self.model.named_parameters() if not plain(n)]
        no_decay = [p for n, p in self.model.named_parameters() if plain(n)]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg["lr"], betas=tuple(cfg["betas"]), eps=cfg["eps"],
        )
        steps = cfg["schedule_steps"]
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s: lr_lambda(s, steps, cfg["warmup_steps"], cfg["min_lr_ratio"], cfg["final_constant_steps"]),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def train_dataloader(self):
        return DataLoader(StepTicks(), batch_size=None)

    # --- evaluation ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> tuple[dict[str, float], dict | None]:
        """Per-domain validation loss (token-weighted mean) and, for MoE, per-domain routing counts."""
        was_training = self.model.training
        self.model.eval()
        metrics, routing = {}, {}
        for domain in self.data.domains:
            total, count = 0.0, 0
            expert_counts = None
            for x, y in self.data.val_batches(domain, self.train_cfg["val_batch_size"], self.train_cfg["val_tokens"]):
                with self.trainer.precision_plugin.forward_context():
                    out = self.model(x.to(self.device))
                loss = torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), y.to(self.device).flatten(),
                                                         reduction="sum")
                total, count = total + loss.item(), count + y.numel()
                if self.model.moe is not None:
                    tpe = self.model.tokens_per_expert().cpu()
                    expert_counts = tpe if expert_counts is None else expert_counts + tpe
            metrics[f"val_loss/{domain}"] = total / count
            if expert_counts is not None:
                routing[domain] = expert_counts.tolist()
        metrics["val_loss"] = sum(metrics[f"val_loss/{d}"] for d in self.data.domains) / len(self.data.domains)
        if self.model.moe is not None:
            self.last_similarity = self.model.expert_similarity()
            metrics["expert_similarity"] = sum(self.last_similarity) / len(self.last_similarity)
        self.model.train(was_training)
        return metrics, (routing or None)


MEASURED = ("tokens_per_s", "elapsed_s", "peak_mem_gib")  # metrics.csv columns of the machine, not the math


class StepMemory:
    """Peak memory of the training steps, from when training started: on a GPU the allocator's peak
    (`max_memory_allocated`), on a CPU how far the process's resident set grew beyond what it held when
    training started (Linux VmHWM - VmRSS then; gradients, optimizer states, activations). None elsewhere."""

    def __init__(self, device: torch.device):
        self.device, self.start = device, 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        elif Path("/proc/self/clear_refs").exists():
            try:
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
                self.start = self._status_bytes("VmRSS")
            except OSError:
                self.device = None

    @staticmethod
    def _status_bytes(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise OSError(f"no {field} in /proc/self/status")

    def peak_bytes(self) -> int | None:
        if self.device is None:
            return None
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        if self.device.type == "cpu" and self.start:
            return self._status_bytes("VmHWM") - self.start
        return None


def grad_norm(module: torch.nn.Module) -> float:
    """The global L2 norm of the gradients; under FSDP each rank holds a shard of each, so the squared norms of
    the shards are summed over the ranks."""
    grads = [p.grad.detach() for p in module.parameters() if p.grad is not None]
    if not grads:
        return float("nan")
    sharded = [g.to_local().float().square().sum() for g in grads if is_sharded(g)]
    whole = [g.float().square().sum() for g in grads if not is_sharded(g)]
    total = 0.0
    if sharded:
        shards = torch.stack(sharded).sum()
        torch.distributed.all_reduce(shards)
        total += shards.item()
    if whole:
        total += torch.stack(whole).sum().item()
    return math.sqrt(total)


class RunRecorder(L.Callback):
    """Writes metrics.csv (one row per logged step; append-only, flushed per row) and routing counts,
    evaluates on schedule, and measures throughput. On resume it drops rows past the restored step."""

    def __init__(self, run_dir: Path, domains: list[str], is_moe: bool, train_cfg: dict, on_eval=None, on_log=None,
                 scorer=None):
        self.path = Path(run_dir) / "metrics.csv"
        self.columns = ["step", "tokens", "train_loss", "lm_loss", "lr", "grad_norm"]
        self.columns += ["lb_loss", "z_loss"] if is_moe else []
        self.columns += ["val_loss"] + [f"val_loss/{d}" for d in domains]
        self.columns += ["routing/imbalance", "routing/entropy", "routing/specialization",
                         "expert_similarity"] if is_moe else []
        # downstream scores at validation points (eval.in_training: `dropup.evaluation.scoring.Scorer`)
        self.scorer = scorer
        self.columns += scorer.columns if scorer is not None else []
        self.columns += list(MEASURED)
        self.cfg, self.on_eval, self.on_log = train_cfg, on_eval, on_log  # on_log: each logged row (the heartbeat)
        self._paused = 0.0  # seconds of validation and scoring since the clock started: not training time
        self.tokens_per_step = train_cfg["batch_size"] * train_cfg["seq_len"]
        # validations beyond every val_every steps: the points an artefact reads off a longer run's curve
        self.extra_val_steps = {int(t) // self.tokens_per_step for t in train_cfg.get("eval_tokens") or ()}
        self.final: dict[str, float] = {}
        self.routing = None
        self.resumed_from: int | None = None
        self._clock = None
        # Fault injection for resume tests: behave like a job killed right after this step's checkpoint (an
        # exception, or with DROPUP_CRASH_SIGNAL=KILL a SIGKILL).
        self.crash_at_step = int(os.environ.get("DROPUP_CRASH_AT_STEP", -1))

    def _validates_at(self, step: int) -> bool:
        return step % self.cfg["val_every"] == 0 or step in self.extra_val_steps

    def _write(self, trainer, row: dict) -> None:
        if trainer.is_global_zero:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, self.columns).writerow({k: row.get(k, "") for k in self.columns})
            for logger in trainer.loggers:  # e.g. wandb: the same numbers as the CSV
                logger.log_metrics({k: v for k, v in row.items() if k != "step" and v != ""}, step=row["step"])
            if self.on_log is not None:
                self.on_log()

    def _evaluate(self, trainer, module, final: bool = False) -> None:
        started = time.perf_counter()
        metrics, routing = module.evaluate()
        metrics.update(summarize(routing))
        if self.scorer is not None and self.scorer.due(trainer.global_step, self.cfg["val_every"], final):
            metrics.update(self.scorer.score(module.model, trainer.precision_plugin.forward_context, module.device))
        self._paused += time.perf_counter() - started
        step = trainer.global_step
        self.final.update(metrics)
        self.routing = routing
        self._write(trainer, {"step": step, "tokens": step * self.tokens_per_step, **metrics})
        if self.on_eval is not None and trainer.is_global_zero:
            self.on_eval(step, metrics, routing)

    def on_train_start(self, trainer, module):
        step = trainer.global_step
        self.resumed_from = step if step > 0 else None
        if trainer.is_global_zero:
            rows = []
            if self.path.exists() and step > 0:  # a run killed before its first checkpoint starts over from step 0
                with open(self.path, newline="") as f:
                    rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
            with open(self.path, "w", newline="") as f:
                writer = csv.DictWriter(f, self.columns)
                writer.writeheader()
                writer.writerows(rows)
            have_val = any(int(r["step"]) == step and r.get("val_loss") for r in rows)
        else:
            have_val = False
        have_val = trainer.strategy.broadcast(have_val, src=0)
        if step == 0 or (self._validates_at(step) and not have_val):
            self._evaluate(trainer, module)
        self._memory = StepMemory(module.device)
        self._clock, self._paused = (time.perf_counter(), step), 0.0

    def on_before_optimizer_step(self, trainer, module, optimizer):
        step = trainer.global_step + 1  # the step this update completes: the one on_train_batch_end may log
        if step % self.cfg["log_every"] == 0 or step == self.cfg["steps"]:
            module._grad_norm = grad_norm(module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if not module.completes_step:  # a micro-batch inside an optimizer step: nothing to record yet
            return
        step = trainer.global_step
        if step == self.crash_at_step:
            if os.environ.get("DROPUP_CRASH_SIGNAL") == "KILL":  # as the OOM killer does: no chance to write
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"DROPUP_CRASH_AT_STEP={step}: simulated crash (tests kill runs this way)")
        if step % self.cfg["log_every"] == 0 or step == self.cfg["steps"]:
            start, start_step = self._clock
            elapsed = time.perf_counter() - start
            training = max(elapsed - self._paused, 1e-9)  # tokens/s counts training only, not validation or scoring
            losses = {k: trainer.strategy.reduce(v, reduce_op="mean").item() for k, v in module.last_losses.items()}
            row = {"step": step, "tokens": step * self.tokens_per_step, "train_loss": losses["loss"],
                   "lm_loss": losses["lm_loss"], "lr": trainer.optimizers[0].param_groups[0]["lr"],
                   "grad_norm": module.__dict__.pop("_grad_norm", ""),  # this step's, never an earlier one
                   "tokens_per_s": (step - start_step) * self.tokens_per_step / training,
                   "elapsed_s": elapsed, **{k: v for k, v in losses.items() if k in ("lb_loss", "z_loss")}}
            peak = self._memory.peak_bytes()
            if peak is not None:  # the largest over the ranks
                row["peak_mem_gib"] = trainer.strategy.reduce(torch.tensor(float(peak), device=module.device),
                                                              reduce_op="max").item() / 2**30
            self.final.update(train_loss=losses["loss"], lm_loss=losses["lm_loss"],
                              **{k: v for k, v in losses.items() if k == "lb_loss"})
            self._write(trainer, row)
        if self._validates_at(step) and step != self.cfg["steps"]:
            self._evaluate(trainer, module)

    def on_train_end(self, trainer, module):
        self._evaluate(trainer, module, final=True)
