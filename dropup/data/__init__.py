"""Data: prepared token shards per domain, batches that depend only on (stream, seed, step), per-domain validation.

`ensure_prepared(data_cfg, ...)` builds (once, under a lock, resuming an interrupted build) or finds the prepared
dataset a config names (dropup.data.prepare has the pipeline and the folder format); `TokenData`
(dropup.data.loader) serves training batches and fixed validation windows from it. This module does not import
torch, so preparation's worker processes start light.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

from dropup.data.corpus import DataError, HFDiskDocuments, JsonlDocuments, PackageDocuments
from dropup.data.prepare import BuildSettings, prepare as build_dataset  # (not `prepare`: the module's name)
from dropup.data.streams import DATA_STREAM_VERSION, STREAMS
from dropup.paths import project_path
from dropup.schema import DEFAULT_TOKENIZER_SAMPLE_CHARS

SOURCES = ("packages", "jsonl", "hf_disk", "tokens")
# The data settings that determine the prepared token files (and so key their cache folder and the seed store).
PREPARATION_FIELDS = ("source", "path", "domains", "vocab_size", "val_fraction", "max_chars_per_domain",
                      "tokenizer_sample_chars")
# Added after prepared folders and seeds were first keyed: at this value a field leaves the keys as they were (the
# bundled corpus is smaller than the default sample, so its tokenizer is the whole-split one it always was).
KEY_NEUTRAL_AT = {"tokenizer_sample_chars": DEFAULT_TOKENIZER_SAMPLE_CHARS}


def preparation_identity(data_cfg: dict) -> dict:
    """The settings that determine a prepared dataset, as keyed (fields at their KEY_NEUTRAL_AT value left out)."""
    return {k: data_cfg.get(k) for k in PREPARATION_FIELDS
            if not (k in KEY_NEUTRAL_AT and data_cfg.get(k, KEY_NEUTRAL_AT[k]) == KEY_NEUTRAL_AT[k])}


def _key(data_cfg: dict, tokenizer_hash: str | None) -> str:
    fields = preparation_identity(data_cfg)
    fields["tokenizer"] = tokenizer_hash
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:12]


def build_settings(data_cfg: dict) -> BuildSettings:
    optional = {k: data_cfg[k] for k in ("chunk_chars", "shard_chars", "dedup_bucket_records", "num_proc")
                if data_cfg.get(k) is not None}
    return BuildSettings(domains=tuple(data_cfg["domains"]), vocab_size=int(data_cfg["vocab_size"]),
                         val_fraction=float(data_cfg["val_fraction"]),
                         max_chars_per_domain=data_cfg.get("max_chars_per_domain"),
                         tokenizer_sample_chars=data_cfg.get("tokenizer_sample_chars",
                                                             DEFAULT_TOKENIZER_SAMPLE_CHARS),
                         **optional)


def documents_of(data_cfg: dict, data_root: Path, log=print):
    """The document reader that data.source names."""
    source, domains = data_cfg["source"], list(data_cfg["domains"])
    if source == "packages":
        return PackageDocuments(Path(data_root) / "sources", domains, log=lambda m: log(f"[data] {m}"))
    if source == "jsonl":
        return JsonlDocuments(data_cfg["path"], domains)
    return HFDiskDocuments(data_cfg["path"], domains)


def ensure_prepared(data_cfg: dict, data_root: Path, tokenizer_path: Path | None = None, log=print) -> Path:
    """The prepared dataset folder for `data_cfg`, built on first use (cached by a hash of its settings)."""
    source = data_cfg["source"]
    if source not in SOURCES:
        raise DataError(f"data.source={source!r} is unknown; choose one of {SOURCES}")
    if source == "tokens":
        path = Path(data_cfg["path"] or "")
        if not (path / "manifest.json").is_file():
            raise DataError(f"data.path={path} has no manifest.json: point it at a prepared token folder "
                            "(token shards and a manifest.json with dtype, vocab_size and the shard index)")
        return path
    if source in ("jsonl", "hf_disk") and not data_cfg.get("path"):
        raise DataError(f"data.source={source} needs data.path: set it on the command line, e.g. data.path=...")
    tok_hash = hashlib.sha256(tokenizer_path.read_bytes()).hexdigest() if tokenizer_path else None
    out = Path(data_root) / f"{data_cfg['name']}-{_key(data_cfg, tok_hash)}"
    if (out / "manifest.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if (out / "manifest.json").is_file():
            return out
        documents = documents_of(data_cfg, data_root, log)
        build_dataset(out, documents, build_settings(data_cfg), tokenizer_path, log=lambda m: log(f"[data] {m}"))
        log(f"[data] prepared {out}")
    return out


def seed_tokenizer(seed_model) -> Path | None:
    """A Hugging Face seed model's tokenizer.json, which then tokenizes the corpus (None: train a BPE)."""
    if seed_model in (None, "auto"):
        return None
    path = Path(seed_model) / "tokenizer.json"
    return path if path.is_file() else None


def prepared_data_dir(cfg: DictConfig, log) -> Path:
    """The prepared dataset a run config names, built on first use (an HF seed model's tokenizer tokenizes the
    corpus); relative paths are the project's."""
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    if isinstance(data_cfg.get("path"), list):
        data_cfg["path"] = [str(project_path(p)) for p in data_cfg["path"]]
    elif data_cfg.get("path"):
        data_cfg["path"] = str(project_path(data_cfg["path"]))
    return ensure_prepared(data_cfg, project_path(cfg.paths.data_dir), seed_tokenizer(cfg.get("seed_model")), log=log)


def __getattr__(name: str):
    if name == "TokenData":  # imports torch: only when asked for
        from dropup.data.loader import TokenData

        return TokenData
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DATA_STREAM_VERSION", "SOURCES", "STREAMS", "TokenData", "documents_of", "ensure_prepared",
           "prepared_data_dir", "preparation_identity", "seed_tokenizer"]
