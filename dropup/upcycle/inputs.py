"""The --dense inputs: HF directories of a supported family (sharded or not, read through the index) or dropup runs."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


from dropup.config import ConfigError, ModelConfig
from dropup.hf import read_hf_config, renamed_from_hf
from dropup.init.base import dense_shapes
from dropup.shards import CheckpointReader, scan
from dropup.upcycle.common import CARRIED_FILES, INDEX, KEPT_CONFIG_FIELDS, PICKLED


@dataclass
class Dense:
    """One --dense input: its architecture, its tensors under our names, and what the output carries over."""

    path: Path
    kind: str  # "hf" or "run"
    model: ModelConfig
    tensors: dict  # our name -> shards.Stored
    config_fields: dict = field(default_factory=dict)
    carried: list[Path] = field(default_factory=list)

    def reader(self) -> CheckpointReader:
        return CheckpointReader(self.tensors)

    def identity(self) -> dict:
        """What the progress file compares to tell whether a re-run converts the same input."""
        files = sorted({s.path for s in self.tensors.values()})
        return {"path": str(self.path), "kind": self.kind,
                "files": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]}


def open_dense(path: Path) -> Dense:
    path = path.resolve()
    if not path.is_dir():
        raise ConfigError(f"--dense {path} is not a directory: name a Hugging Face model directory of a supported "
                          "family (config.json + *.safetensors) or a dropup run directory")
    if (path / "config.json").is_file():
        return _open_hf(path)
    if (path / "model.safetensors").is_file() and (_run_config(path) is not None):
        return _open_run(path)
    raise ConfigError(f"--dense {path} has no config.json (Hugging Face) and no model.safetensors + config.yaml "
                      "(dropup run): it is not a model directory")


def _weight_files(path: Path) -> tuple[list[Path], dict | None]:
    """The safetensors files of an HF directory and its index's weight map (None when unsharded)."""
    index = path / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ConfigError(f"{index} is not a safetensors index ({err}): re-save the model") from None
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise ConfigError(f"{path}: shard {missing[0]} listed in {INDEX} is missing: copy the complete "
                              "checkpoint (all shards)")
        return [path / f for f in files], weight_map
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"], None
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files, None
    if any(next(path.glob(pattern), None) for pattern in PICKLED):
        raise ConfigError(f"{path} holds only pickled weights (.bin/.pt), which dropup never unpickles: re-save "
                          "the model with safetensors, e.g. model.save_pretrained(dir, safe_serialization=True)")
    raise ConfigError(f"{path} has no *.safetensors weights")


def scan_hf_dir(path: Path) -> dict:
    """The tensors of an HF directory (HF name -> shards.Stored), read through its index where it has one, so a
    stray copy or adapter file beside the shards is never merged in; the index and the shards must agree."""
    files, weight_map = _weight_files(path)
    stored = scan(files)
    if weight_map is not None:
        for name, entry in stored.items():
            if weight_map.get(name) != entry.path.name:
                raise ConfigError(f"{path}: tensor {name} is in {entry.path.name} but {INDEX} says "
                                  f"{weight_map.get(name)}: the checkpoint is inconsistent; re-save it")
        absent = sorted(set(weight_map) - set(stored))
        if absent:
            raise ConfigError(f"{path}: tensor {absent[0]} listed in {INDEX} is in none of the shards")
    return stored


def _open_hf(path: Path) -> Dense:
    config, model, moe = read_hf_config(path)
    if moe.enabled:
        raise ConfigError(f"--dense {path} is a {config.get('model_type')} (MoE) model: upcycling starts from a "
                          "dense model")
    stored = scan_hf_dir(path)
    if model.tie_embeddings:  # transformers ties lm_head at load: a stored copy is redundant (and not ours)
        stored.pop("lm_head.weight", None)
    return Dense(path, "hf", model, _as_dense_names(model, stored, rename=lambda n: renamed_from_hf(n, model.family)),
                 config_fields={k: config[k] for k in KEPT_CONFIG_FIELDS if config.get(k) is not None},
                 carried=[path / f for f in CARRIED_FILES if (path / f).is_file()])


def _run_config(path: Path) -> Path | None:
    for candidate in (path / ".hydra" / "config.yaml", path / "config.yaml"):
        if candidate.is_file():
            return candidate
    return None


def _open_run(path: Path) -> Dense:
    """A dropup run directory: model.safetensors in our naming; the model config from its Hydra config."""
    from omegaconf import OmegaConf

    results = path / "results.json"
    status = json.loads(results.read_text()).get("status") if results.is_file() else None
    if status != "completed":
        raise ConfigError(f"--dense {path} is a dropup run whose results.json says status={status!r}: only a "
                          "completed run's weights are final; wait for it or pick another run")
    try:
        cfg = OmegaConf.load(_run_config(path))
        model = ModelConfig(**OmegaConf.to_container(cfg.model, resolve=True))
        moe_enabled = bool(cfg.get("moe", {}).get("enabled", False))
    except Exception as err:  # any unreadable config is the same problem to the user
        raise ConfigError(f"{_run_config(path)}: cannot read its model config ({err})") from None
    if moe_enabled:
        raise ConfigError(f"--dense {path} is an MoE run: upcycling starts from a dense model")
    stored = scan([path / "model.safetensors"])
    return Dense(path, "run", model, _as_dense_names(model, stored, rename=lambda name: name))


def _as_dense_names(model: ModelConfig, stored: dict, rename) -> dict:
    """Stored tensors under our names; a tensor with no place in a dense model of `model` is an error."""
    expected = dense_shapes(model)
    tensors = {}
    for name, entry in stored.items():
        ours = rename(name)
        if ours not in expected:
            raise ConfigError(f"{entry.path}: tensor {name} is not part of a dense {model.family} model of this "
                              "config: remove stray files (adapters, other checkpoints) from the directory")
        tensors[ours] = entry
    return tensors


def _same_architecture(inputs: list[Dense]) -> ModelConfig:
    """BTX averages and mixes several dense models: they must share one architecture exactly."""
    first = inputs[0]
    for other in inputs[1:]:
        diff = [f"{k}={v} (vs {getattr(first.model, k)})" for k, v in asdict(other.model).items()
                if k != "name" and v != getattr(first.model, k)]
        if diff:
            raise ConfigError(f"--dense {other.path} differs from --dense {first.path} in {', '.join(diff)}: "
                              "all dense models must have the same architecture (BTX mixes their tensors)")
    return first.model
