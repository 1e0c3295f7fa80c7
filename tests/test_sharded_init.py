"""Sharded construction (trainer=fsdp): every rank writes only its shards of the initial weights, from a per-tensor
stream over lazily read dense models (`dropup.init.producer`), and its slice equals the same slice of the
single-process init bit for bit, for every strategy and 1, 2 and 4 ranks.

One launch of 4 gloo processes checks all three rank counts: FSDP meshes of 1 (each rank alone), 2 (two pairs) and
4 ranks, so each count is a real sharding (its own process group, padding, dim-1 expert placement) without a
launch each. The references are built here, once, by the single-process path (whole state dicts, `load_state_dict`
into an fp32 model), and the workers compare their gathered weights with them.

Run as a script (`python tests/test_sharded_init.py <spec.json>`) this file is the worker of one rank.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))

from dropup.config import ConfigError, ModelConfig, MoEConfig  # noqa: E402
from dropup.init import producer  # noqa: E402
from dropup.init.btx import BranchTrainMix  # noqa: E402
from dropup.init.drop import DropUpcycling  # noqa: E402
from dropup.init.naive import NaiveUpcycling  # noqa: E402
from dropup.init.noise import NoiseUpcycling  # noqa: E402
from dropup.init.scratch import Scratch  # noqa: E402
from dropup.init.shapes import dense_shapes  # noqa: E402
from dropup.model import Transformer  # noqa: E402

SEED = 5
RANKS = 4
SIZES = (1, 2, 4)
# vocabulary 61: tok_emb and lm_head split unevenly over 2 and 4 ranks (FSDP2 pads them)
M = ModelConfig(name="t", vocab_size=61, n_layers=2, d_model=32, d_ff=48, n_heads=4, n_kv_heads=2)
PHI3 = ModelConfig(**{**vars(M), "family": "phi3"})  # fused qkv_proj and gate_up_proj: parts read by rows
MOE = MoEConfig(enabled=True, num_experts=4, top_k=2)
AUX_FREE = MoEConfig(enabled=True, num_experts=4, top_k=2, lb_mode="aux_free")  # a routing-bias buffer
GROUPED = MoEConfig(enabled=True, num_experts=4, top_k=2, granularity=2)  # virtual groups of 2
SHARED = MoEConfig(enabled=True, num_experts=4, top_k=2, shared_expert_d_ff=64)


def cases(dirs: dict) -> dict:
    """name -> (model, moe, strategy, what it reads): "built" from dense dirs (dropup runs, or an HF dir by
    `hf_reader`), "pretrained" from an MoE checkpoint, or "dense" from scratch."""
    drop = DropUpcycling(ratio=0.5)
    return {
        "scratch": (M, AUX_FREE, Scratch(), ("built", [])),
        "naive": (M, MOE, NaiveUpcycling(), ("built", [dirs["seed"]])),
        "drop-joint": (M, MOE, drop, ("built", [dirs["seed"]])),
        "drop-per-matrix": (M, MOE, DropUpcycling(ratio=0.5, index_mode="per_matrix", shuffle=True),
                            ("built", [dirs["seed"]])),
        "noise": (M, MOE, NoiseUpcycling(), ("built", [dirs["seed"]])),
        "btx": (M, MOE, BranchTrainMix(), ("built", [dirs["seed"], dirs["branch"]])),
        "virtual-groups": (M, GROUPED, DropUpcycling(ratio=0.25), ("built", [dirs["seed"]])),
        "shared-expert": (M, SHARED, drop, ("built", [dirs["seed"]])),
        "hf-phi3-bf16": (PHI3, MOE, drop, ("hf", [dirs["hf_dense"]])),
        "pretrained-run": (M, AUX_FREE, None, ("pretrained", [dirs["moe_run"]])),
        "pretrained-hf": (M, MOE, None, ("pretrained-hf", [dirs["hf_moe"]])),
        "dense-scratch": (M, None, Scratch(), ("dense", [])),
    }


def sharded_weights(model, moe, strategy, reads) -> producer.InitialWeights:
    """What a rank streams: the trainer's own `dense_seeds.initial_weights` for dropup runs; the HF directories
    through `hf_reader` (its caller only reads config.json first, which a worker need not import transformers for)."""
    from omegaconf import OmegaConf

    from dropup import dense_seeds
    from dropup.init.pretrained import Pretrained

    kind, dirs = reads
    if kind == "hf":
        return producer.built(strategy, [producer.hf_reader(Path(d), model) for d in dirs], model, moe, SEED)
    if kind == "pretrained-hf":
        return producer.pretrained(producer.hf_reader(Path(dirs[0]), model), model, moe, dirs[0])
    cfg = OmegaConf.create({"seed": SEED})
    return dense_seeds.initial_weights(cfg, Pretrained() if kind == "pretrained" else strategy, model, moe, dirs)


# --- the worker (one rank) ---------------------------------------------------------------------------------------

def _worker(spec_path: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from dropup.fsdp import shard_model
    from dropup.tensors import full, is_sharded

    spec = json.loads(Path(spec_path).read_text())
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    meshes = {size: init_device_mesh("cpu", (world // size, size), mesh_dim_names=("copies", "shards"))["shards"]
              for size in SIZES}
    # the first mesh of each size (ranks 0..size-1) is checked; the other copies would repeat its work
    meshes = {size: mesh for size, mesh in meshes.items() if rank < size}
    report = {"rank": rank, "checked": [], "mismatches": [], "sharded": []}
    for name, (model_cfg, moe, strategy, reads) in cases(spec["dirs"]).items():
        reference = load_file(str(Path(spec["refs"]) / f"{name}.safetensors"))
        for size, mesh in meshes.items():
            with producer.on_meta():
                model = Transformer(model_cfg, moe)
            shard_model(model, mesh, bf16=False)
            producer.materialize_on_every_rank(model, sharded_weights(model_cfg, moe, strategy, reads), "cpu",
                                               group=mesh.get_group())
            tensors = [*model.parameters(), *model.buffers()]
            if any(t.is_meta or (is_sharded(t) and t.to_local().is_meta) for t in tensors):
                report["mismatches"].append([name, size, "left on meta"])
            state = model.state_dict()
            if sorted(state) != sorted(reference):
                report["mismatches"].append([name, size, "names"])
            for key, tensor in state.items():
                whole = full(tensor)
                if key in reference and not (whole.dtype == reference[key].dtype and torch.equal(whole, reference[key])):
                    report["mismatches"].append([name, size, key])
                if is_sharded(tensor) and tensor.to_local().numel() < whole.numel():
                    report["sharded"].append([name, size, key])
            report["checked"].append([name, size])
    # a rank that cannot build its shards stops every rank, each with one error naming it
    failing = producer.InitialWeights(producer.dense_scratch(M, SEED).shapes, _fails_on_rank_1, "a test stream")
    with producer.on_meta():
        model = Transformer(M)
    shard_model(model, meshes[RANKS], bf16=False)
    try:
        producer.materialize_on_every_rank(model, failing, "cpu")
        report["failure"] = None
    except ConfigError as err:
        report["failure"] = str(err)
    report["scoring"] = _score_split_and_alone(spec, meshes[RANKS])
    Path(spec["out"], f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def word_tokenizer(words: int):
    """A word-level tokenizer over w0..w{words-2} and <eot> (id words-1): enough text for a model of that vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(words - 1)} | {"<eot>": words - 1}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<eot>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return tokenizer


def scoring_requests():
    """Requests of all three kinds, uneven over 4 ranks (one rank has no generation: it keeps the others company),
    with generations that stop at different lengths."""
    from lm_eval.api.instance import Instance

    text = lambda a, n: " ".join(f"w{(a * 7 + k * 3) % 50}" for k in range(n))  # noqa: E731
    pairs = [(text(a, 2 + a % 5), " " + text(a + 1, 1 + a % 3)) for a in range(7)] + [("", text(9, 3))]
    return {
        "loglikelihood": [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)],
        "loglikelihood_rolling": [Instance("loglikelihood_rolling", {}, (text(b, 10 + 9 * b),), b) for b in range(3)],
        "generate_until": [Instance("generate_until", {}, (text(c, 4), {"until": ["w3"], "max_gen_toks": 1 + 2 * c}), c)
                           for c in range(3)],
    }


def _score_split_and_alone(spec, mesh) -> dict:
    """The in-training evaluation adapter on a model sharded over the 4 ranks (every forward a collective), the
    requests split over the ranks, against this process scoring all of them alone on an unsharded copy."""
    from dropup.evaluation.adapter import ModelLM
    from dropup.fsdp import shard_model

    reference = load_file(str(Path(spec["refs"]) / "drop-joint.safetensors"))
    alone = Transformer(M, MOE).eval()
    alone.load_state_dict(reference)
    with producer.on_meta():
        sharded = Transformer(M, MOE)
    shard_model(sharded, mesh, bf16=False)
    producer.materialize(sharded, producer.InitialWeights(
        {k: v.shape for k, v in reference.items()}, lambda names, regions: ((n, reference[n]) for n in names), "ref"),
        "cpu")
    sharded.eval()
    tokenizer = word_tokenizer(M.vocab_size)
    out = {}
    for name, model, split in (("split", sharded, True), ("alone", alone, False)):
        lm = ModelLM(lambda ids, m=model: m(ids).logits, tokenizer, max_length=16, eot_id=M.vocab_size - 1,
                     batch_size=2, split=split)
        requests = scoring_requests()
        out[name] = {"loglikelihood": lm.loglikelihood(requests["loglikelihood"]),
                     "rolling": lm.loglikelihood_rolling(requests["loglikelihood_rolling"]),
                     "generated": lm.generate_until(requests["generate_until"]), "forwards": lm.forwards}
    return out


def _fails_on_rank_1(names, regions):
    import torch.distributed as dist

    for name, tensor in producer.dense_scratch(M, SEED).tensors(names):
        if dist.get_rank() == 1:
            raise ConfigError("shard file unreadable on this node")
        yield name, tensor


# --- the test ----------------------------------------------------------------------------------------------------

def _random_state(shapes: dict, seed: int) -> dict[str, torch.Tensor]:
    """Dense weights whose every tensor differs (norm gains included), so a copy from the wrong place shows."""
    g = torch.Generator().manual_seed(seed)
    return {k: (1.0 if k.endswith("norm.weight") else 0.0) + 0.05 * torch.randn(tuple(s), generator=g)
            for k, s in shapes.items()}


def _save_sharded_hf(state: dict, config: dict, out: Path, files: int = 3) -> None:
    """An HF directory: config.json and the tensors spread over `files` safetensors shards with an index."""
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(config))
    names = sorted(state)
    weight_map = {}
    for i in range(files):
        part = {n: state[n].contiguous() for n in names[i::files]}
        file = f"model-{i + 1:05d}-of-{files:05d}.safetensors"
        save_file(part, str(out / file))
        weight_map.update({n: file for n in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The dense and MoE checkpoints every case reads, and each case's single-process step-0 weights."""
    from dropup import dense_seeds
    from dropup.hf import hf_config_dict, to_hf
    from dropup.init import build_moe_state
    from dropup.init.scratch import dense_state

    root = tmp_path_factory.mktemp("sharded-init")
    dirs = {name: root / name for name in ("seed", "branch", "moe_run", "hf_dense", "hf_moe")}
    for i, name in enumerate(("seed", "branch")):
        dirs[name].mkdir()
        save_file(_random_state(dense_shapes(M), i), str(dirs[name] / "model.safetensors"))
    seed = load_file(str(dirs["seed"] / "model.safetensors"))
    moe_state = build_moe_state(DropUpcycling(ratio=0.5), [seed], M, AUX_FREE, 1)
    moe_state.update({k: torch.randn(v.shape) for k, v in moe_state.items() if k.endswith("expert_bias")})
    dirs["moe_run"].mkdir()
    save_file(moe_state, str(dirs["moe_run"] / "model.safetensors"))
    phi3 = {k: v.to(torch.bfloat16) for k, v in to_hf(_random_state(dense_shapes(PHI3), 7), family="phi3").items()}
    _save_sharded_hf(phi3, {**hf_config_dict(PHI3), "torch_dtype": "bfloat16"}, dirs["hf_dense"])
    hf_moe = to_hf({k: v for k, v in moe_state.items() if not k.endswith("expert_bias")}, MOE, layout="per-expert")
    _save_sharded_hf(hf_moe, hf_config_dict(M, MOE), dirs["hf_moe"])
    dirs = {k: str(v) for k, v in dirs.items()}

    refs = root / "refs"
    refs.mkdir()
    for name, (model_cfg, moe, strategy, (kind, paths)) in cases(dirs).items():
        if kind in ("pretrained", "pretrained-hf"):
            state, _ = dense_seeds.load_pretrained(paths[0], model_cfg, moe)
        elif kind == "dense":
            state = dense_state(model_cfg, SEED)
        else:
            state = build_moe_state(strategy, [dense_seeds.load_dense(p, model_cfg) for p in paths], model_cfg, moe,
                                    SEED)
        model = Transformer(model_cfg, moe)
        model.load_state_dict(model.complete_state(state), strict=True)  # what a single-process run starts from
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(refs / f"{name}.safetensors"))
    return dirs, refs, root


@pytest.fixture(scope="module")
def reports(sources) -> list[dict]:
    """The one launch of 4 gloo ranks (the worker below): each rank's report."""
    from dropup import ddp

    dirs, refs, root = sources
    out = root / "out"
    out.mkdir()
    spec = root / "spec.json"
    spec.write_text(json.dumps({"dirs": dirs, "refs": str(refs), "out": str(out)}))
    ranks = ddp.start_ranks([sys.executable, __file__, str(spec)], ddp.rank_environment(RANKS), range(RANKS),
                            cwd=ROOT)
    codes = [r.wait(timeout=300) for r in ranks]
    assert codes == [0] * RANKS
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(RANKS)]


def test_every_strategy_is_bit_identical_to_the_single_process_init_on_1_2_and_4_ranks(sources, reports):
    dirs = sources[0]
    names = list(cases(dirs))
    for rank, report in enumerate(reports):
        assert report["mismatches"] == []
        sizes = [size for size in SIZES if rank < size]  # rank r is in the first mesh of each size above r
        assert report["checked"] == [[name, size] for name in names for size in sizes]
        sharded = {(name, size) for name, size, _ in report["sharded"]}
        assert {(name, size) for name in names for size in sizes if size > 1} <= sharded  # every case really split
        assert not any(size == 1 for _, size in sharded)
        if rank == 1:
            assert report["failure"] == "shard file unreadable on this node"
        else:
            assert report["failure"] == ("rank 1 could not build its shards of the initial weights: ConfigError: "
                                         "shard file unreadable on this node")


def test_scoring_split_over_sharded_ranks_equals_one_process_scoring_alone(reports):
    """Evaluation during training under FSDP: the adapter splits lm-eval's requests over 4 ranks in lock-step (every
    rank makes as many forwards, each a collective) and gathers the answers: the same as one process alone."""
    forwards = {r["scoring"]["split"]["forwards"] for r in reports}
    assert len(forwards) == 1  # lock-step: a rank that ran out kept stepping with the others
    for report in reports:
        split, alone = report["scoring"]["split"], report["scoring"]["alone"]
        assert [greedy for _, greedy in split["loglikelihood"]] == [greedy for _, greedy in alone["loglikelihood"]]
        assert [s for s, _ in split["loglikelihood"]] == pytest.approx([s for s, _ in alone["loglikelihood"]], abs=1e-5)
        assert split["rolling"] == pytest.approx(alone["rolling"], abs=1e-5)
        assert split["generated"] == alone["generated"]
        assert split["forwards"] < alone["forwards"]  # each rank did a share of the work
    lengths = {len(text.split()) for text in reports[0]["scoring"]["alone"]["generated"]}
    assert len(lengths) > 1  # the generations stopped at different lengths


def test_nothing_is_left_on_meta_for_lightning_to_reinitialize():
    """Lightning's ModelParallelStrategy runs `to_empty` + `reset_parameters` on whatever is still on the meta device
    after configure_model: after `materialize` nothing is, so its pass changes no weight. (A model left on meta,
    the plausible bug, would be re-drawn by `Transformer.reset_parameters`: the check below would fail.)"""
    from lightning.fabric.utilities.init import _has_meta_device_parameters_or_buffers, \
        _materialize_distributed_module

    weights = producer.built(Scratch(), [], M, AUX_FREE, SEED)
    with torch.device("meta"):
        model = Transformer(M, AUX_FREE)
    producer.materialize(model, weights, "cpu")
    assert not _has_meta_device_parameters_or_buffers(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _materialize_distributed_module(model, torch.device("cpu"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(before[k], v) for k, v in weights.state().items())


# --- bad input: one error line, before any rank starts, nothing written ------------------------------------------

def _dense_run(where: Path, model: ModelConfig) -> Path:
    where.mkdir(parents=True)
    save_file(_random_state(dense_shapes(model), 0), str(where / "model.safetensors"))
    return where


def _hf_seed(where: Path, damage) -> Path:
    """A dense HF llama of the run's size (vocabulary 512), in 3 shards with an index, then `damage`d."""
    from dropup.hf import hf_config_dict, to_hf

    model = ModelConfig(vocab_size=512, n_layers=2, d_model=32, d_ff=64, n_heads=4, n_kv_heads=2)
    _save_sharded_hf(to_hf(_random_state(dense_shapes(model), 0)), hf_config_dict(model), where)
    damage(sorted(where.glob("model-*.safetensors")))
    return where


def _truncate(files):
    files[1].write_bytes(files[1].read_bytes()[:-100])


FSDP = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "model=tiny", "model.vocab_size=512",
        "model.d_model=32", "model.d_ff=64", "model.n_heads=4", "model.n_kv_heads=2", "model.n_layers=2"]


@pytest.mark.parametrize("case, init, message", [
    ("seed of other shapes", ["init=drop"], "dense model 0 tensor tok_emb.weight has shape (512, 48) but model="),
    ("truncated shard", ["init=drop"], "is not a readable safetensors file"),
    ("index naming a missing file", ["init=drop"], "listed in model.safetensors.index.json is missing"),
    ("checkpoint of another model", ["init=pretrained", "moe=mixtral"], "lacks tensor 'layers.0.ffn.w_gate_up': it is a checkpoint of another model"),
])
def test_bad_input_is_one_error_on_rank_zero_before_any_rank_starts(case, init, message, tmp_path, store):
    from conftest import run_py_inline

    seed = {"seed of other shapes": lambda: _dense_run(tmp_path / "seed", ModelConfig(vocab_size=512, d_model=48,
                                                                                     n_layers=2, d_ff=64)),
            "truncated shard": lambda: _hf_seed(tmp_path / "seed", _truncate),
            "index naming a missing file": lambda: _hf_seed(tmp_path / "seed", lambda files: files[2].unlink()),
            "checkpoint of another model": lambda: _dense_run(tmp_path / "seed", ModelConfig(
                vocab_size=512, n_layers=2, d_model=32, d_ff=64, n_heads=4, n_kv_heads=2)),
            }[case]()
    run = tmp_path / "run"
    code, _, err = run_py_inline(*FSDP, *init, f"seed_model={seed}", "data=fixture", *store, f"hydra.run.dir={run}")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert json.loads((run / "results.json").read_text())["status"] == "failed"
    assert not (run / "initial.safetensors").exists() and not (run / "checkpoints").exists()
    assert not (run / "ddp_config.yaml").exists()  # no other rank was started


if __name__ == "__main__":
    _worker(sys.argv[1])
