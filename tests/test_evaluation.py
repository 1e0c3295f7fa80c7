"""Downstream evaluation of the training model (`dropup.evaluation`): the lm-eval adapter against lm-eval's own
HFLM on the same weights, scoring during training (its cadence, its columns, and that it changes no training
number), and the bad input it refuses before training. The rank split under FSDP is tested with the sharded init's
launch (tests/test_sharded_init.py)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

from dropup.config import ConfigError, ModelConfig, MoEConfig
from dropup.evaluation.adapter import ModelLM
from dropup.lit import MEASURED
from test_sharded_init import scoring_requests, word_tokenizer
from test_train import config, rows, yaml_task
from dropup.train import train

M = ModelConfig(name="t", vocab_size=61, n_layers=2, d_model=32, d_ff=48, n_heads=4, n_kv_heads=2)
MOE = MoEConfig(enabled=True, num_experts=4, top_k=2)


def test_the_adapter_scores_as_lm_evals_hflm_on_the_exported_weights(tmp_path):
    """Same weights, same requests (contexts longer than the window, an empty context, rolling documents of several
    windows, greedy generations with a stop word): the adapter's answers equal HFLM's."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from dropup.hf import hf_config, to_hf
    from dropup.model import Transformer

    torch.manual_seed(0)
    ours = Transformer(M, MOE).eval()
    for p in ours.parameters():  # sharper than the init's: distinct argmaxes, scores far from each other
        p.data.normal_(0, 0.3) if p.dim() > 1 else None
    eot = M.vocab_size - 1
    # the end-of-text token is the word tokenizer's last id, as `stage=export` writes a run's own (not 1 and 2,
    # the config class's defaults, at which generation would stop)
    hf = AutoModelForCausalLM.from_config(hf_config(M, MOE, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot))
    hf.generation_config.update(bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)
    hf.load_state_dict(to_hf(ours.state_dict()), strict=True)
    hf.save_pretrained(tmp_path / "hf")
    PreTrainedTokenizerFast(tokenizer_object=word_tokenizer(M.vocab_size), eos_token="<eot>",
                            bos_token="<eot>").save_pretrained(tmp_path / "hf")
    reference = HFLM(pretrained=str(tmp_path / "hf"), dtype="float32", device="cpu", batch_size=2, max_length=16)
    adapter = ModelLM(lambda ids: ours(ids).logits, word_tokenizer(M.vocab_size), max_length=16, eot_id=eot,
                      batch_size=3)
    requests = scoring_requests()
    want, got = reference.loglikelihood(requests["loglikelihood"]), adapter.loglikelihood(requests["loglikelihood"])
    assert [g for _, g in got] == [g for _, g in want]
    assert [s for s, _ in got] == pytest.approx([s for s, _ in want], abs=1e-4)
    rolling = requests["loglikelihood_rolling"]
    assert adapter.loglikelihood_rolling(rolling) == pytest.approx(reference.loglikelihood_rolling(rolling), abs=1e-4)
    generate = requests["generate_until"]
    assert adapter.generate_until(generate) == reference.generate_until(generate)


def _tasks(where: Path) -> Path:
    """Two local tasks: multiple choice (loglikelihood) and generation (generate_until, a stop sequence)."""
    where.mkdir()
    choices = where / "choices.jsonl"
    choices.write_text("".join(json.dumps({"question": f"def f{i}():", "choices": ["return", "banana"], "answer": 0})
                               + "\n" for i in range(4)))
    (where / "tiny.yaml").write_text(yaml_task(choices))
    prompts = where / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"question": f"def g{i}():\n   ", "answer": " return"}) + "\n"
                               for i in range(3)))
    (where / "gen.yaml").write_text(f"""task: dropup_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {prompts}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
""")
    return where


def test_scoring_during_training_fills_its_columns_on_schedule_and_changes_no_training_number(tmp_path, store,
                                                                                               monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks = _tasks(tmp_path / "tasks")
    common = ["init=naive", "trainer.precision=32-true", *store]
    plain = train(config(tmp_path / "plain", *common))
    scored = train(config(tmp_path / "scored", *common, "eval=lm_eval", "eval.in_training=true", "eval.every=2",
                          "eval.tasks=[dropup_tiny,{task: dropup_gen, shots: 0, metric: exact_match}]",
                          f"eval.include_path={tasks}", "eval.limit=4"))
    columns = ["eval/dropup_tiny", "eval/dropup_gen", "eval/avg", "eval/n_tasks", "eval_s"]
    scored_rows, plain_rows = rows(tmp_path / "scored"), rows(tmp_path / "plain")
    validated = [int(r["step"]) for r in scored_rows if r["val_loss"]]
    assert validated == [0, 10, 20]  # val_every=10 over 20 steps
    # step 0, every 2nd validation point (step 20 = 2 x 10) and the end: step 10 is skipped
    assert [int(r["step"]) for r in scored_rows if r["eval/avg"]] == [0, 20]
    for row in scored_rows:
        if row["eval/avg"]:
            assert all(row[c] != "" for c in columns) and row["tokens"] != ""
            tiny, gen = float(row["eval/dropup_tiny"]), float(row["eval/dropup_gen"])
            assert 0 <= tiny <= 1 and 0 <= gen <= 1 and float(row["eval/avg"]) == pytest.approx((tiny + gen) / 2)
            assert float(row["eval/n_tasks"]) == 2 and float(row["eval_s"]) > 0
    # scoring re-seeds Python, NumPy and torch and runs forwards: no training or validation number may move
    assert len(scored_rows) == len(plain_rows)
    for a, b in zip(scored_rows, plain_rows):
        assert {k: v for k, v in a.items() if k not in (*columns, *MEASURED)} == \
               {k: v for k, v in b.items() if k not in MEASURED}
    assert scored["metrics"]["eval/avg"] == float(scored_rows[-1]["eval/avg"])
    assert "eval/avg" not in plain["metrics"]


@pytest.mark.parametrize("overrides,message", [
    (["eval=paper", "eval.in_training=true", "eval.tasks=[no_such_task_anywhere]"],
     "names 'no_such_task_anywhere', which lm-eval does not know"),
    (["eval.in_training=true"], "eval=none names none: add eval=lm_eval"),
    (["eval=lm_eval", "eval.in_training=true", "eval.tasks=[hellaswag]", "eval.include_path=/nonexistent/tasks"],
     "eval.include_path=/nonexistent/tasks is not a directory"),
])
def test_bad_evaluation_settings_are_one_error_before_training(overrides, message, tmp_path, store, monkeypatch):
    monkeypatch.setattr("dropup.train.load_data", lambda *a, **k: pytest.fail("corpus work before the eval check"))
    with pytest.raises(ConfigError, match=message):
        train(config(tmp_path / "run", *store, *overrides))
    assert not (tmp_path / "run" / "results.json").exists()


def test_scoring_leaves_the_generators_as_it_found_them(monkeypatch):
    """lm-eval's simple_evaluate seeds Python, NumPy and torch: after a scoring the training draws go on from
    where they were."""
    import random

    import numpy as np

    from dropup.evaluation.scoring import Scorer

    def reseeding(self, lm):
        random.seed(0), np.random.seed(1234), torch.manual_seed(1234)
        return {"eval/x": 0.5}

    monkeypatch.setattr(Scorer, "_evaluate", reseeding)
    scorer = Scorer.__new__(Scorer)  # the scoring alone: no tasks to check
    scorer.cfg, scorer.tokenizer, scorer.seq_len, scorer.eot_id = {}, word_tokenizer(M.vocab_size), 16, 60
    from dropup.model import Transformer

    model = Transformer(M).train()
    draws = lambda: (random.random(), float(np.random.rand()), float(torch.rand(1)))  # noqa: E731
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    want = draws()
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    scores = scorer.score(model, contextlib.nullcontext, "cpu")
    assert draws() == want
    assert scores["eval/avg"] == 0.5 and scores["eval/n_tasks"] == 1 and model.training  # its mode restored


PROXY = ["eval=proxy", "eval.proxy.choices=3", "eval.proxy.items=60", "eval.proxy.context_tokens=24",
         "eval.proxy.continuation_tokens=8"]


def test_the_proxy_is_deterministic_has_equal_length_candidates_and_separates_trained_from_untrained(tmp_path, store,
                                                                                                    monkeypatch):
    """eval=proxy on the fixture corpus (3-way here: its English split has three documents): step 0's untrained
    model scores within 3 standard errors of chance, the same model after 80 steps at least 3 above; and
    `stage=eval eval=proxy` (lm-eval's own HFLM on the exported model) gives the final in-training scores."""
    from tokenizers import Tokenizer

    from dropup.evaluation.proxy import ProxySettings, build_proxy

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    train(config(tmp_path / "run", "moe=none", "init=scratch", "trainer.precision=32-true", "train.tokens=40960",
                 "train.val_every=40", "eval.in_training=true", *PROXY, *store))
    scored = [r for r in rows(tmp_path / "run") if r["eval/avg"]]
    assert [int(r["step"]) for r in scored] == [0, 40, 80]
    chance, n = 1 / 3, 3 * 60
    se = (chance * (1 - chance) / n) ** 0.5
    untrained, trained = float(scored[0]["eval/avg"]), float(scored[-1]["eval/avg"])
    assert abs(untrained - chance) <= 3 * se
    assert trained >= chance + 3 * se
    from dropup.stages import evaluate

    final = {k: float(v) for k, v in scored[-1].items() if k.startswith("eval/") and v}
    exported = evaluate(config(tmp_path / "unused", "stage=eval", f"export.run={tmp_path / 'run'}", *PROXY, *store))
    assert set(exported) == set(final) and exported == pytest.approx(final, abs=1e-9)
    assert json.loads((tmp_path / "run" / "results.json").read_text())["metrics"]["eval/avg"] == pytest.approx(trained)
    # the files: built once per corpus and settings, the same bytes when built again
    data_dir = next(p for p in Path(store[0].split("=", 1)[1]).iterdir() if (p / "manifest.json").is_file())
    settings = ProxySettings(choices=3, items=60, context_tokens=24, continuation_tokens=8)
    built = build_proxy(data_dir, ["ja", "en", "code"], settings)
    first = {p.name: p.read_bytes() for p in built.iterdir()}
    for p in built.iterdir():
        p.unlink()
    built.rmdir()
    assert build_proxy(data_dir, ["ja", "en", "code"], settings) == built
    assert {p.name: p.read_bytes() for p in built.iterdir()} == first
    tokenizer = Tokenizer.from_file(str(data_dir / "tokenizer.json"))
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids  # noqa: E731
    for domain in ("ja", "en", "code"):
        items = [json.loads(line) for line in (built / f"{domain}.jsonl").read_text().splitlines()]
        assert len(items) == 60 and {item["answer"] for item in items} == {0, 1, 2}  # the answer's place varies
        for item in items:
            base = len(encode(item["context"]))
            assert base == 24 and all(len(encode(item["context"] + c)) - base == 8 for c in item["choices"])


def test_the_paper_suite_composes_with_its_twelve_tasks_shots_and_metrics_all_known_to_lm_eval():
    from omegaconf import OmegaConf

    from dropup.evaluation.tasks import check_known, task_manager, task_specs

    eval_cfg = OmegaConf.to_container(config("unused", "eval=paper").eval, resolve=True)
    specs = task_specs(eval_cfg)
    assert len(specs) == 12 and len({s.name for s in specs}) == 12
    shots = {s.name: s.shots for s in specs}
    assert shots["ja_leaderboard_xlsum"] == 1 and shots["bbh_cot_fewshot"] == 3  # Appendix B.2
    assert {v for k, v in shots.items() if k not in ("ja_leaderboard_xlsum", "bbh_cot_fewshot")} == {4}
    assert {s.metric for s in specs if s.name in ("dropup_jemhopqa", "dropup_niilc", "dropup_jsquad")} == {"char_f1"}
    assert all(s.metric for s in specs)  # each names its metric, none takes "the first"
    check_known(specs, task_manager(eval_cfg, [s.name for s in specs]))  # lm-eval indexes all twelve


@pytest.mark.parametrize("prediction,references,want", [
    ("東京都", ["東京"], 0.8),  # P 2/3, R 1
    ("ああい", ["あい"], 0.8),  # characters count as a multiset: the repeated one is not matched twice
    ("あ い", ["あい"], 1.0),  # whitespace is not a character of the answer
    ("京都", ["大阪", "京都府"], 0.8),  # the best reference
    ("", ["京都"], 0.0),
])
def test_character_f1(prediction, references, want):
    import importlib.util

    from dropup.paths import ROOT

    spec = importlib.util.spec_from_file_location("utils", ROOT / "dropup/evaluation/paper_tasks/utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    assert utils.char_f1(references, [prediction]) == pytest.approx(want)
