"""lm-evaluation-harness's `LM` interface over the model being trained: no export, no second copy of the weights.

`ModelLM` is a `TemplateLM`, so lm-eval's own code turns (context, continuation) pairs into tokens (trailing spaces
move to the continuation; an empty context is conditioned on the end-of-text token), as for its `HFLM`; this class
only scores token sequences, as `HFLM` does for a causal model:

- **loglikelihood**: the input is (context + continuation)[-(L + 1):][:-1] for a context of L tokens; the score is
  the sum of log-softmax over the continuation's positions, and `is_greedy` says whether each continuation token
  is the argmax there. Requests are batched by length (longest first) and padded on the right, which a causal
  model never attends to.
- **loglikelihood_rolling**: a document's log-likelihood over disjoint windows of L tokens, each conditioned on
  what precedes it in its window (lm-eval's `get_rolling_token_windows`, prefix = end-of-text).
- **generate_until**: greedy decoding from the context's last L - max_gen_toks tokens (cut from the left), until a
  stop sequence (the request's `until`, and end-of-text) appears or `max_gen_toks` tokens are made. The model has no
  KV cache: each new token is a forward over the whole window, so a request costs up to max_gen_toks forwards of at
  most L tokens; `max_gen_toks` (per task, default 256, capped by `max_gen_toks_cap`) bounds it.

Ranks: lm-eval sees one process (`world_size` 1, every rank builds the same requests); the requests are split
here, rank r taking every world-th one from r, and the answers gathered (`all_gather_object`) into the original
order, so every rank returns the same list. Under FSDP every forward is a collective, so the ranks step in
lock-step: each runs as many forwards as the busiest rank, a rank that has run out repeating a one-token dummy,
and generation stops only when every rank's request has stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tokenizers import Tokenizer

Forward = Callable[[torch.Tensor], torch.Tensor]  # token ids (B, T) -> logits (B, T, V)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class ModelLM(TemplateLM):
    """`forward`: token ids (B, T) on `device` -> logits (B, T, V); `max_length`: the model's context L (the
    training sequence length); `eot_id`: the end-of-text token (the empty context's prefix, a stop token);
    `split`: share the requests with the other ranks (the default where torch.distributed is initialized)."""

    backend = "causal"

    def __init__(self, forward: Forward, tokenizer: Tokenizer, max_length: int, eot_id: int,
                 device: torch.device | str = "cpu", batch_size: int = 8, max_gen_toks_cap: int = 256,
                 split: bool = True):
        super().__init__()
        self._dist = split and _distributed()  # split the requests over the ranks (False: this process alone)
        self._forward, self.tok, self.max_length, self._eot = forward, tokenizer, int(max_length), int(eot_id)
        self._device, self.batch_size, self.max_gen_toks_cap = torch.device(device), int(batch_size), max_gen_toks_cap
        self.forwards = 0  # forward passes made (the cost of scoring, e.g. for a test of the lock-step)

    # lm-eval sees a single process: the ranks split the requests themselves (module docstring)
    @property
    def rank(self) -> int:
        return 0

    @property
    def world_size(self) -> int:
        return 1

    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def tokenizer_name(self) -> str:
        return "dropup"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string, add_special_tokens=False).ids

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    # --- one forward, every rank in step -----------------------------------------------------------------------
    def _logits(self, rows: list[list[int]]) -> torch.Tensor:
        """Log-softmax (fp32) of the rows, right-padded to the longest."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self._eot, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        self.forwards += 1
        with torch.no_grad():
            return F.log_softmax(self._forward(ids.to(self._device)).float(), dim=-1).cpu()

    def _dummy(self) -> None:
        self._logits([[self._eot]])

    def _split(self, items: list) -> tuple[list[int], int, int]:
        """The indices of `items` this rank takes, and (rank, world)."""
        rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if self._dist else (0, 1)
        return list(range(rank, len(items), world)), rank, world

    def _gather(self, mine: dict[int, object], total: int) -> list:
        if not self._dist:
            return [mine[i] for i in range(total)]
        everyone: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, mine)
        merged = {k: v for part in everyone for k, v in part.items()}
        return [merged[i] for i in range(total)]

    def _in_step(self, count: int) -> int:
        """The largest `count` over the ranks (each must make as many forwards as the busiest)."""
        if not self._dist:
            return count
        t = torch.tensor([count], dtype=torch.long, device=self._device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t.item())

    # --- lm-eval's three request types ---------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        mine, _, _ = self._split(requests)
        # longest first, as HFLM: similar lengths share a batch
        order = sorted(mine, key=lambda i: -len(requests[i][1] + requests[i][2]))
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        results: dict[int, tuple[float, bool]] = {}
        for b in range(self._in_step(len(batches))):
            if b >= len(batches):
                self._dummy()
                continue
            rows, spans = [], []
            for i in batches[b]:
                _, context, continuation = requests[i]
                row = (context + continuation)[-(self.max_length + 1):][:-1]
                rows.append(row)
                spans.append((len(row), continuation))
            logprobs = self._logits(rows)
            for i, row_logprobs, (length, continuation) in zip(batches[b], logprobs, spans):
                at = row_logprobs[length - len(continuation):length]  # the positions predicting the continuation
                target = torch.tensor(continuation, dtype=torch.long)
                score = float(at.gather(-1, target[:, None]).sum())
                results[i] = (score, bool((at.argmax(-1) == target).all()))
        return self._gather(results, len(requests))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for index, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self._eot, max_seq_len=self.max_length,
                    context_len=1)):
                windows.append(((None, None), context, continuation))
                owner.append(index)
        scores = self._loglikelihood_tokens(windows)
        totals = [0.0] * len(requests)
        for index, (score, _) in zip(owner, scores):
            totals[index] += score
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        mine, _, _ = self._split(requests)
        results: dict[int, str] = {}
        for k in range(self._in_step(len(mine))):
            if k < len(mine):
                context, kwargs = requests[mine[k]].args
                results[mine[k]] = self._generate_one(context, dict(kwargs))
            else:
                self._generate_none()
        return self._gather(results, len(requests))

    def _generate_one(self, context: str, kwargs: dict) -> str:
        until = kwargs.get("until") or []
        stops = ([until] if isinstance(until, str) else list(until)) + [self.tok_decode([self._eot])]
        budget = min(int(kwargs.get("max_gen_toks", self.max_gen_toks_cap)), self.max_gen_toks_cap)
        ids = self.tok_encode(context)[-max(1, self.max_length - budget):]
        made: list[int] = []
        text, active = "", budget > 0
        while self._any_generating(active):  # one round per token, every rank in step
            if not active:
                self._dummy()
                continue
            token = int(self._logits([(ids + made)[-self.max_length:]])[0, -1].argmax())
            made.append(token)
            text = self.tok_decode(made)
            active = token != self._eot and not any(s and s in text for s in stops) and len(made) < budget
        for stop in stops:
            if stop and stop in text:
                text = text.split(stop)[0]
        return text

    def _generate_none(self) -> None:
        """A rank without a request this round: a dummy forward per token the others make."""
        while self._any_generating(False):
            self._dummy()

    def _any_generating(self, me: bool) -> bool:
        if not self._dist:
            return me
        t = torch.tensor([1 if me else 0], dtype=torch.long, device=self._device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())
