"""The --dense inputs: HF directories of a supported family (sharded or not, read through the index) or dropup runs."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


from dropup import families
from dropup.config import ConfigError, ModelConfig
from dropup.families.mapping import Unplaced
from dropup.hf import read_hf_config
from dropup.init.shapes import dense_shapes
from dropup.shards import Assembled, CheckpointReader, Stored, paths_of, scan, scan_hf_dir
from dropup.upcycle.common import CARRIED_FILES, KEPT_CONFIG_FIELDS


@dataclass
class Dense:
    """One --dense input: its architecture, its tensors under our names, and what the output carries over."""

    path: Path
    kind: str  # "hf" or "run"
    model: ModelConfig
    tensors: dict  # our name -> shards.Stored, or shards.Assembled (rows of stored tensors: a fused tensor's part)
    config_fields: dict = field(default_factory=dict)
    carried: list[Path] = field(default_factory=list)

    def reader(self) -> CheckpointReader:
        return CheckpointReader(self.tensors)

    def identity(self) -> dict:
        """What the progress file compares to tell whether a re-run converts the same input."""
        files = sorted(set().union(*(paths_of(s) for s in self.tensors.values())))
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


def _open_hf(path: Path) -> Dense:
    config, model, moe = read_hf_config(path)
    if moe.enabled:
        raise ConfigError(f"--dense {path} is a {config.get('model_type')} (MoE) model: upcycling starts from a "
                          "dense model")
    stored = scan_hf_dir(path)
    if model.tie_embeddings:  # transformers ties lm_head at load: a stored copy is redundant (and not ours)
        stored.pop("lm_head.weight", None)
    return Dense(path, "hf", model, _as_dense_names(model, stored, mapped=True),
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
    return Dense(path, "run", model, _as_dense_names(model, stored, mapped=False))


def _as_dense_names(model: ModelConfig, stored: dict[str, Stored], mapped: bool) -> dict[str, Stored | Assembled]:
    """Stored tensors under our names, through the family's tensor mapping where `mapped` (HF names; a fused
    tensor's parts become row ranges of it) or as they are (a dropup run); a tensor with no place in a dense model
    of `model` is an error."""
    expected = dense_shapes(model)

    def stray(name: str) -> ConfigError:
        return ConfigError(f"{stored[name].path}: tensor {name} is not part of a dense {model.family} model of this "
                           "config: remove stray files (adapters, other checkpoints) from the directory")

    if not mapped:
        tensors = dict(stored)
    else:
        try:
            tensors = families.family(model.family).mapper("dense").sources(stored, expected)
        except Unplaced as err:
            raise stray(err.name) from None
    for ours, entry in tensors.items():
        if ours not in expected:
            raise stray(entry.pieces[0].stored.name if isinstance(entry, Assembled) else entry.name)
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
