"""`eval=proxy`: a downstream proxy that tiny models score above chance, built from the corpus's held-out text.

Per domain, a k-way multiple-choice continuation task: a context of `context_tokens` tokens from one validation
document, and k candidate continuations of `continuation_tokens` tokens each: the document's true next passage and
k - 1 passages from other documents of the same domain. Scored by log-likelihood (lm-eval's `acc`), chance is 1/k.

Why it has no length bias: every candidate is exactly `continuation_tokens` tokens *as lm-eval encodes it* (the
whole text minus the context; a candidate whose re-encoding differs, or a context that ends in whitespace, which
lm-eval would move into the continuation, is redrawn), so no candidate wins by having fewer tokens to pay for.
The distractors start at token offsets drawn like the true passage's, so none starts mid-token differently.

Built at first use into `<data dir>/proxy/<key>/` (one JSONL and one task YAML per domain), keyed by the corpus's
`corpus_hash` and the proxy's settings, from a generator seeded by them: the same corpus and settings give the
same files, byte for byte. Written to a temporary directory and renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from dropup.config import ConfigError
from dropup.data.loader import TokenStream, split_files


@dataclass(frozen=True)
class ProxySettings:
    choices: int = 4  # k
    items: int = 200  # per domain
    context_tokens: int = 48
    continuation_tokens: int = 16


def task_name(domain: str) -> str:
    return f"dropup_proxy_{domain}"


def _documents(data_dir: Path, manifest: dict, domain: str) -> list[np.ndarray]:
    stream = TokenStream(split_files(data_dir, manifest, domain, "val"), np.dtype(manifest["dtype"]))
    tokens = stream.window(0, stream.size)
    cuts = np.flatnonzero(tokens == int(manifest["eot_id"]))
    docs = np.split(tokens, cuts + 1)
    return [d[d != int(manifest["eot_id"])] for d in docs]


def _items(docs: list[np.ndarray], tokenizer: Tokenizer, settings: ProxySettings, rng: np.random.Generator,
           domain: str) -> list[dict]:
    c, n, k = settings.context_tokens, settings.continuation_tokens, settings.choices
    long_enough = [i for i, d in enumerate(docs) if len(d) >= c + n]
    passages = [i for i, d in enumerate(docs) if len(d) >= n]
    if not long_enough or len(passages) < k:
        raise ConfigError(f"eval=proxy: domain {domain!r} has too few validation documents of {c + n} tokens for a "
                          f"{k}-way task: lower eval.proxy.context_tokens / continuation_tokens / choices")

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    items, tries = [], 0
    while len(items) < settings.items:
        tries += 1
        if tries > 200 * settings.items:
            raise ConfigError(f"eval=proxy: domain {domain!r} gave only {len(items)} of eval.proxy.items="
                              f"{settings.items} items (its texts re-encode to other token counts): lower it")
        doc = int(rng.choice(long_enough))
        start = int(rng.integers(0, len(docs[doc]) - (c + n) + 1))
        context = tokenizer.decode(docs[doc][start:start + c].tolist(), skip_special_tokens=False)
        others = [int(i) for i in rng.permutation(passages) if i != doc][:k - 1]
        candidates = [docs[doc][start + c:start + c + n]]
        for other in others:
            at = int(rng.integers(0, len(docs[other]) - n + 1))
            candidates.append(docs[other][at:at + n])
        texts = [tokenizer.decode(ids.tolist(), skip_special_tokens=False) for ids in candidates]
        if not context or context != context.rstrip():
            continue
        base = len(encode(context))
        if base != c or any(len(encode(context + t)) - base != n for t in texts) or len(set(texts)) < k:
            continue
        order = rng.permutation(k)
        items.append({"context": context, "choices": [texts[i] for i in order],
                      "answer": int(np.flatnonzero(order == 0)[0])})
    return items


def _task_yaml(domain: str, jsonl: Path) -> str:
    return "\n".join([
        f"task: {task_name(domain)}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(jsonl))}",
        "test_split: test",
        "output_type: multiple_choice",
        'doc_to_text: "{{context}}"',
        'doc_to_choice: "{{choices}}"',
        'doc_to_target: "{{answer}}"',
        'target_delimiter: ""',  # the candidates continue the context's text exactly
        "metric_list:",
        "  - metric: acc",
        "",
    ])


def build_proxy(data_dir: Path, domains: list[str], settings: ProxySettings = ProxySettings()) -> Path:
    """The proxy's task folder for this prepared corpus (an lm-eval include_path), built if missing."""
    data_dir = Path(data_dir)
    manifest = json.loads((data_dir / "manifest.json").read_text())
    if settings.choices < 2 or settings.items < 1 or settings.context_tokens < 1 or settings.continuation_tokens < 1:
        raise ConfigError(f"eval.proxy={settings}: need choices >= 2 and positive items and token counts")
    what = json.dumps({"corpus": manifest["corpus_hash"], "domains": sorted(domains), **vars(settings)},
                      sort_keys=True)
    key = hashlib.sha256(what.encode()).hexdigest()[:16]
    out = data_dir / "proxy" / key
    if (out / "proxy.json").is_file():
        return out
    tokenizer = Tokenizer.from_file(str(data_dir / "tokenizer.json"))
    partial = out.with_name(f"{key}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for domain in domains:
        seed = int.from_bytes(hashlib.sha256(f"{key}/{domain}".encode()).digest()[:8], "little")
        items = _items(_documents(data_dir, manifest, domain), tokenizer, settings, np.random.default_rng(seed),
                       domain)
        jsonl = out / f"{domain}.jsonl"  # the name it will have once renamed
        (partial / jsonl.name).write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))
        (partial / f"{task_name(domain)}.yaml").write_text(_task_yaml(domain, jsonl))
    (partial / "proxy.json").write_text(what + "\n")
    try:
        partial.rename(out)
    except OSError:  # another process built it first: the same bytes
        shutil.rmtree(partial, ignore_errors=True)
    return out
