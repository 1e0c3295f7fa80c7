"""`stage=export` and `stage=eval`: a run as a Hugging Face directory, and lm-evaluation-harness on it.

    python run.py stage=export export.run=<run dir> [export.out=<dir>]
    python run.py stage=eval export.run=<run dir> eval=lm_eval eval.tasks=[...] [eval.include_path=<task dir>]

Export writes a transformers directory of the run's family (dense) or of the MoE family it becomes (Mixtral,
Qwen2-MoE, Qwen3-MoE) with the run's weights and tokenizer (what `AutoModelForCausalLM` /
`AutoTokenizer.from_pretrained` load), under a temporary name renamed when complete. The files are those
transformers' `save_pretrained` writes, byte for byte, but the weights go one tensor at a time from the run's
`model.safetensors` to the export (`save_pretrained_streamed`): neither the model nor its state is ever in memory.
Eval adds each task's main score to the run's results.json as `metrics["eval/<task>"]`, where the tables find it.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from dropup import balancing, families
from dropup.config import ConfigError, architecture
from dropup.data.corpus import EOT
from dropup.evaluation.tasks import average, check_known, run_tasks, task_manager, task_specs
from dropup.families.mapping import rows_of
from dropup.files import write_json_atomic
from dropup.hf import hf_config, hf_config_dict
from dropup.model import Transformer
from dropup.shards import Assembled, Rows, Stored, read_entry, scan, write_safetensors
from dropup.upcycle.common import CARRIED_FILES

log = logging.getLogger(__name__)


def run_config(run_dir: Path) -> DictConfig:
    for path in (run_dir / "config.yaml", run_dir / ".hydra" / "config.yaml"):
        if path.is_file():
            return OmegaConf.create(yaml.safe_load(path.read_text()))
    raise ConfigError(f"{run_dir} has no .hydra/config.yaml: export.run must name a dropup run directory")


def tokenizer_file(run_dir: Path, data_dir: Path) -> Path | None:
    """The tokenizer the run was trained with: the prepared data whose manifest has the run's tokenizer hash."""
    results = json.loads((run_dir / "results.json").read_text())
    wanted = (results.get("provenance") or {}).get("tokenizer_hash")
    for manifest in sorted(Path(data_dir).glob("*/manifest.json")):
        if json.loads(manifest.read_text()).get("tokenizer_hash") == wanted:
            return manifest.parent / "tokenizer.json"
    return None


def _hf_seed(run_dir: Path) -> Path | None:
    """The Hugging Face directory the run was upcycled from (its provenance), if it was."""
    results = json.loads((run_dir / "results.json").read_text())
    seed = (results.get("provenance") or {}).get("seed_model")
    seed = seed[0] if isinstance(seed, list) else seed
    return Path(seed) if seed and (Path(seed) / "config.json").is_file() else None


def export(run_dir: Path, out: Path, data_dir: Path) -> Path:
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast


    run_dir, out = Path(run_dir), Path(out)
    weights = run_dir / "model.safetensors"
    if not weights.is_file():
        raise ConfigError(f"{run_dir} has no model.safetensors: only completed runs can be exported")
    model_cfg, moe_cfg = architecture(run_config(run_dir))
    hf_config_dict(model_cfg, moe_cfg)  # what the family cannot hold (a shared expert in a Mixtral) fails first
    hf_seed = _hf_seed(run_dir)
    tokenizer = None
    if hf_seed is not None:  # upcycled from a Hugging Face checkpoint: its tokenizer files and special tokens
        seed_config = json.loads((hf_seed / "config.json").read_text())
        ids = {k: seed_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings")
               if seed_config.get(k) is not None}
    else:
        trained_with = tokenizer_file(run_dir, data_dir)
        if trained_with is None:
            raise ConfigError(f"the tokenizer of {run_dir} is not in {data_dir}: set paths.data_dir to where its "
                              "data is")
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(trained_with), eos_token=EOT, bos_token=EOT,
                                            unk_token=EOT, pad_token=EOT)
        ids = {k: tokenizer.eos_token_id for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    # the seed family's MoE family (Mixtral, Qwen2-MoE, Qwen3-MoE), or the family itself for a dense run
    config = hf_config(model_cfg, moe_cfg, **ids)
    note = balance_note(moe_cfg, config.model_type)
    if note:
        log.warning(note)
    stored = scan([weights])  # our name -> where it is in the file (the header only: no tensor is read)
    biases = sorted(k for k in stored if k.endswith("ffn.expert_bias"))
    if biases:
        _warn_routing_bias(stored, biases, model_cfg, moe_cfg)
    with torch.device("meta"):  # transformers' class only names, shapes and types the tensors: none is allocated
        model = AutoModelForCausalLM.from_config(config)
    ours = {k: v for k, v in stored.items() if k not in biases}
    sources = hf_sources(ours, model_cfg, moe_cfg, "stacked")  # what transformers holds in memory
    held = list(model.state_dict())
    missing, unexpected = [k for k in held if k not in sources], sorted(set(sources) - set(held))
    if unexpected or missing != (["lm_head.weight"] if model_cfg.tie_embeddings else []):
        raise ConfigError(f"{run_dir}: its weights do not fill a {config.model_type} model (missing {missing}, "
                          f"unexpected {unexpected})")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    # what it writes: an MoE family's experts stacked or one by one (Mixtral, the Qwen MoEs), as it stores them
    save_pretrained_streamed(model, partial, {**hf_sources(ours, model_cfg, moe_cfg, "per-expert"), **sources})
    if tokenizer is not None:
        tokenizer.save_pretrained(partial)
    else:
        for name in CARRIED_FILES:
            if (hf_seed / name).is_file() and not (partial / name).exists():
                shutil.copyfile(hf_seed / name, partial / name)
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out


def hf_sources(stored: dict[str, Stored], model_cfg, moe_cfg, layout: str) -> dict[str, Assembled | torch.Tensor]:
    """Every HF tensor the run's weights make in the expert `layout` (HF name -> the rows of our stored tensors
    it is made of, read only when it is written), and the MoE family's tensors beyond ours
    (`Family.extra_moe_tensors`, small and made here)."""
    adapter = families.family(model_cfg.family)
    moe = moe_cfg if moe_cfg is not None and moe_cfg.enabled else None
    shapes = {name: entry.shape for name, entry in stored.items()}
    out: dict[str, Assembled | torch.Tensor] = {}
    for hf, recipe in adapter.mapper("moe" if moe else "dense", layout).recipes_to_hf(shapes).items():
        rows = tuple(Rows(stored[p.name], p.start or 0, rows_of(stored[p.name].shape)[0] if p.stop is None
                          else p.stop) for p in recipe.pieces)
        out[hf] = Assembled(rows, recipe.shape, stored[recipe.pieces[0].name].dtype, recipe.transform)
    for layer in range(model_cfg.n_layers) if moe else ():
        down = stored.get(f"layers.{layer}.ffn.w_down")
        if down is not None:
            out.update(adapter.extra_moe_tensors(layer, model_cfg, moe, down.dtype))
    return out


def save_pretrained_streamed(model, directory: Path, sources: dict) -> None:
    """`model.save_pretrained(directory)` for a model on the meta device: transformers decides every file as it
    does for a real model (config, generation config, tied weights left out, its on-disk tensor names and expert
    layout, shards and index), and each safetensors file it would write is written by `write_safetensors` (the
    same bytes) with each tensor read from `sources` only when its turn comes, cast to the model's dtype as
    `load_state_dict` would: one tensor in memory, never the whole state (transformers' own writer holds a
    shard's copy, and the model holds another)."""
    from transformers import modeling_utils

    def write_file(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        metas = {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}

        def tensor_of(name: str) -> torch.Tensor:
            if name not in sources:
                raise ConfigError(f"transformers writes {name}, which dropup's {model.config.model_type} tensor "
                                  "tables do not make (dropup/families): the export would be incomplete")
            source = sources[name]
            tensor = read_entry(source) if isinstance(source, Assembled) else source
            if tuple(tensor.shape) != metas[name][0]:
                raise ConfigError(f"{name}: the run's weights make shape {tuple(tensor.shape)}, transformers' "
                                  f"{model.config.model_type} holds {metas[name][0]}")
            return tensor.to(metas[name][1])

        write_safetensors(Path(filename), metas, tensor_of, metadata=metadata)

    # transformers' one call that writes tensor data, swapped for the call's duration (restored whatever happens)
    original = modeling_utils.safe_save_file
    modeling_utils.safe_save_file = write_file
    try:
        model.save_pretrained(directory)
    finally:
        modeling_utils.safe_save_file = original


def balance_note(moe_cfg, model_type: str) -> str | None:
    """What a fine-tune of the export in transformers would do differently from the run's load balancing."""
    if moe_cfg is None:
        return None
    note = balancing.mode(moe_cfg.lb_mode).export_note
    return note.format(model_type=model_type) if note else None


def _warn_routing_bias(stored: dict, biases: list[str], model_cfg, moe_cfg) -> float:
    """aux_free runs route with a per-expert bias that transformers' MoE classes have no place for: say so, and
    by how much the exported model's logits differ from the run's (probe tokens, fp32). Returns that difference.
    The run's model is filled from its file one tensor at a time (one copy of the weights, not two)."""
    with torch.device("meta"):
        model = Transformer(model_cfg, moe_cfg)
    model.to_empty(device="cpu").eval()
    for buffer in model.buffers():  # the routing counts are not in the file; the forward overwrites them
        buffer.zero_()
    state = model.state_dict()
    if set(state) != set(stored):
        raise ConfigError(f"{next(iter(stored.values())).path}: its tensors are not those of the run's model "
                          f"(missing {sorted(set(state) - set(stored))}, unexpected {sorted(set(stored) - set(state))})")
    for name, target in state.items():
        target.copy_(read_entry(stored[name]))
    largest = max(float(state[name].abs().max()) for name in biases)
    tokens = torch.randint(0, model_cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with_bias = model(tokens).logits
        for block in model.layers:
            block.ffn.expert_bias.zero_()
        without = model(tokens).logits
    diff = float((with_bias - without).abs().max())
    log.warning("this run balanced its experts with aux_free routing biases (largest |bias| %.3g), which %s has no "
                "place for: the exported model routes without them, and its logits differ from the run's by up to "
                "%.3g on probe tokens", largest, "the Hugging Face MoE class", diff)
    return diff


def evaluate(run_dir: Path, hf_dir: Path, eval_cfg: dict) -> dict[str, float]:
    """Run lm-evaluation-harness's tasks on an exported directory (`HFLM`), each with its shots and metric
    (`dropup.evaluation.tasks`); record the scores in the run's results.json."""
    specs = task_specs(eval_cfg)
    manager = task_manager(eval_cfg, [spec.name for spec in specs])
    check_known(specs, manager)
    scores, raw = run_tasks("hf", specs, manager, eval_cfg.get("limit"), model_args=f"pretrained={hf_dir},dtype=float32",
                            batch_size=eval_cfg.get("batch_size", 8), device="cpu")
    scores = average(scores)
    results_path = run_dir / "results.json"
    results = json.loads(results_path.read_text())
    results.setdefault("metrics", {}).update(scores)
    results["eval"] = {"tasks": [spec.name for spec in specs], "raw": raw}
    write_json_atomic(results_path, results)
    return scores
