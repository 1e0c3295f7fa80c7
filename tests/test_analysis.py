"""Collection, tables and figures, on fixture run directories and synthetic tables."""

import json
from pathlib import Path

import matplotlib.image
import pandas as pd
import pytest
import yaml

from analysis import sweep
from analysis.collect import collect, curves, label
from analysis import report
from analysis.figures import fig3, fig4, fig5, seed_gap, shared_curves, similarity
from analysis.tables import Cell, balancing, best_rows, granular, method_order, seeds, shared, table1, table8

DOMAINS = ("ja", "en", "code")
TARGETS = {"scratch": "Scratch", "naive": "NaiveUpcycling", "drop": "DropUpcycling", "btx": "BranchTrainMix"}


def make_run(root: Path, name: str, init: str, ratio=None, seed=0, loss=4.0, status="completed", moe=True,
             router="uniform:0.0346", write_results=True, seed_model=None, tokens=10000, schedule_tokens=None,
             data_stream=2):
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    cfg = {"model": {"name": "tiny", "n_layers": 2}, "moe": {"enabled": moe}, "seed": seed,
           "init": {"_target_": f"dropup.init.x.{TARGETS[init]}", "router": router, **({"ratio": ratio} if ratio is not None else {})}}
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    rows = ["step,tokens,train_loss,lr,val_loss," + ",".join(f"val_loss/{d}" for d in DOMAINS)]
    for step in range(0, 101, 10):
        rows.append(f"{step},{step * 100},{loss + 1 - step / 100},0.001,,,,")
        if step % 50 == 0:
            rows.append(f"{step},{step * 100},,,{loss + 1 - step / 100}," + ",".join([str(loss + 1 - step / 100)] * 3))
    (run / "metrics.csv").write_text("\n".join(rows) + "\n")
    if write_results:
        metrics = {"val_loss": loss, **{f"val_loss/{d}": loss + i * 0.1 for i, d in enumerate(DOMAINS)}}
        results = {"status": status, "init": init, "ratio": ratio, "seed": seed, "model": "tiny",
                   "moe": "mixtral" if moe else "none", "tokens": tokens, "steps": 100, "train_flops": 1e9,
                   "schedule_tokens": schedule_tokens or tokens,
                   "total_params": 10, "active_params": 5, "metrics": metrics if status == "completed" else {},
                   "provenance": {"seed_model": seed_model, "data_stream": data_stream},
                   "error": "boom" if status == "failed" else None}
        (run / "results.json").write_text(json.dumps(results))
        if moe:
            counts = {d: [[10 * (e == i) + 1 for e in range(8)] for i in range(2)] for d in DOMAINS}
            (run / "routing.json").write_text(json.dumps({"tokens_per_expert": counts}))
    return run


@pytest.fixture
def runs_dir(tmp_path):
    root = tmp_path / "runs"
    seed = make_run(tmp_path / "seeds", "seed-abc", "scratch", moe=False, loss=5.0)
    for s in (0, 1, 2):
        make_run(root, f"NU-s{s}", "naive", seed=s, loss=4.5 + 0.01 * s, seed_model=str(seed))
        make_run(root, f"DU-0.5-s{s}", "drop", ratio=0.5, seed=s, loss=4.2 + 0.01 * s, seed_model=str(seed))
    make_run(root, "DU-1.0-s0", "drop", ratio=1.0, loss=4.6)
    make_run(root, "FS-s0", "scratch", status="failed")
    make_run(root, "BTX-s0", "btx", write_results=False)  # died before writing anything
    return root


def test_collect_keeps_failed_and_half_written_runs(runs_dir, tmp_path):
    frame = collect([runs_dir], tmp_path / "out" / "runs.csv")
    by_id = frame.set_index("run_id")
    assert by_id.loc["FS-s0", "status"] == "failed" and by_id.loc["FS-s0", "error"] == "boom"
    assert by_id.loc["BTX-s0", "status"] == "incomplete" and by_id.loc["BTX-s0", "label"] == "BTX"
    assert by_id.loc["seed:seed-abc", "role"] == "seed" and by_id.loc["seed:seed-abc", "label"] == "Dense"
    assert by_id.loc["DU-0.5-s1", "label"] == "DU (r=0.5)" and by_id.loc["NU-s2", "label"] == "NU"
    assert by_id.loc["NU-s0", "metrics.val_loss/en"] == pytest.approx(4.6)
    assert by_id.loc["NU-s0", "metrics.routing/imbalance"] > 1  # computed from routing.json
    assert pd.read_csv(tmp_path / "out" / "runs.csv").shape[0] == len(frame) == 10
    # a run that wrote no results.json has no known version (and is not labelled as an older one)
    assert by_id.loc["NU-s0", "data_stream_version"] == 2 and pd.isna(by_id.loc["BTX-s0", "data_stream_version"])
    make_run(tmp_path / "older", "NU-s0", "naive", data_stream=None)  # predates the field: version 1
    assert collect([tmp_path / "older"])["data_stream_version"].tolist() == [1]
    make_run(runs_dir, "NU-v1", "naive", data_stream=None)  # provenance from before the streams had versions
    assert collect([runs_dir]).set_index("run_id").loc["NU-v1", "data_stream_version"] == 1
    assert set(curves(frame)["run_id"]) >= {"NU-s0", "DU-1.0-s0"}


def test_labels():
    assert label("drop", 0.0, True) == label("naive", None, True) == "NU"
    assert label("drop", 0.25, True) == "DU (r=0.25)" and label("scratch", None, False) == "Dense"
    assert label("drop", 0.5, True, shared_expert=True) == "DU (r=0.5) + shared"


def test_shared_expert_runs_are_a_method_of_their_own(runs_dir, tmp_path, monkeypatch):
    """Runs with a shared expert get their own rows in the shared table and stay out of Table 1 and the paper's
    figures, even when they sit in the same results directory."""
    for s in (0, 1):
        run = make_run(runs_dir, f"NU-shared-s{s}", "naive", seed=s, loss=4.4 + 0.01 * s)
        results = json.loads((run / "results.json").read_text())
        (run / "results.json").write_text(json.dumps({**results, "shared_expert_d_ff": 64}))
    frame = collect([runs_dir])
    assert set(frame.loc[frame["shared_expert_d_ff"] > 0, "label"]) == {"NU + shared"}
    table = shared(frame)
    assert table.rows == ["NU", "NU + shared", "DU (r=0.5)", "DU (r=0.5) + shared"]
    assert table.cells[("NU + shared", "val avg")].mean == pytest.approx(4.405)
    assert table.cells[("NU", "val avg")].mean == pytest.approx(4.51)  # NU's three seeds only
    assert table.cells[("DU (r=0.5) + shared", "val avg")].n == 0
    assert table1(frame).cells[("NU", "val avg")].n == 3
    import matplotlib.pyplot as plt

    titles = []
    real_save = plt.Figure.savefig
    monkeypatch.setattr(plt.Figure, "savefig", lambda fig, *a, **k: titles.extend(
        ax.get_title() for ax in fig.axes if ax.get_title()) or real_save(fig, *a, **k))
    fig5(frame, curves(frame), tmp_path)
    assert "NU + shared" not in titles and "NU" in titles
    legend = []
    monkeypatch.setattr(plt.Figure, "savefig", lambda fig, *a, **k: legend.extend(
        t.get_text() for lg in fig.legends for t in lg.get_texts()) or real_save(fig, *a, **k))
    shared_curves(frame, curves(frame), tmp_path)
    assert {"NU (n=3)", "NU + shared (n=2)", "DU (r=0.5) (n=3)"} <= set(legend)


def test_label_variants_sort_after_their_method():
    assert label("naive", None, True, granularity=4, virtual_groups=True) == "NU, G=4 VG"
    assert label("naive", None, True, granularity=4) == "NU, G=4"
    assert label("drop", 0.5, True, lb_mode="aux_free") == "DU (r=0.5), aux-free"
    assert label("drop", 0.5, True, lb_mode="pooled") == "DU (r=0.5)"
    assert label("drop", 0.5, True, lb_mode="pooled", ranks=2) == "DU (r=0.5), per-rank LB"
    assert label("drop", 0.5, True, lb_mode="global_batch", ranks=2) == "DU (r=0.5), global-batch LB"
    labels = ["DU (r=0.5), aux-free", "NU, G=4", "DU (r=0.5)", "NU", "FS"]
    assert sorted(labels, key=method_order) == ["FS", "NU", "NU, G=4", "DU (r=0.5)", "DU (r=0.5), aux-free"]


def _variant(runs_dir, name, init, ratio, loss, granularity=1, virtual_groups=False, lb_mode="pooled", sim=None):
    run = make_run(runs_dir, name, init, ratio=ratio, loss=loss)
    cfg = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    cfg["moe"].update(granularity=granularity, lb_mode=lb_mode)
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    results = json.loads((run / "results.json").read_text())
    results.update(virtual_groups=virtual_groups, lb_mode=lb_mode)
    results["metrics"]["expert_similarity"] = sim
    (run / "results.json").write_text(json.dumps(results))
    if sim is not None:  # a similarity column in the validation rows, falling from 1 to `sim`
        table = pd.read_csv(run / "metrics.csv")
        table["expert_similarity"] = [1 - (1 - sim) * step / 100 if pd.notna(v) else None
                                      for step, v in zip(table["step"], table["val_loss"])]
        table.to_csv(run / "metrics.csv", index=False)
    return run


def test_granular_and_balancing_tables_and_the_similarity_figure(runs_dir, tmp_path, monkeypatch):
    _variant(runs_dir, "NU-G4-s0", "naive", None, 4.9, granularity=4, sim=0.9)
    _variant(runs_dir, "NU-G4-VG-s0", "naive", None, 4.45, granularity=4, virtual_groups=True, sim=0.95)
    _variant(runs_dir, "DU-0.5-auxfree-s0", "drop", 0.5, 4.3, lb_mode="aux_free", sim=0.2)
    frame = collect([runs_dir])
    table = granular(frame)
    assert table.rows[2:] == ["NU, G=4", "NU, G=4 VG", "DU (r=0.5), G=4 VG"]
    assert table.cells[("NU, G=4 VG", "val avg")].mean == pytest.approx(4.45)
    assert table.cells[("NU, G=4", "val at step 0")].mean == pytest.approx(5.9)  # metrics.csv's step-0 row
    assert table.cells[("NU, G=4", "expert similarity")].mean == pytest.approx(0.9)
    assert table.cells[("DU (r=0.5), G=4 VG", "val avg")].n == 0
    assert table1(frame).cells[("NU", "val avg")].n == 3  # the variants stay out of Table 1
    bal = balancing(frame)
    assert bal.cells[("DU (r=0.5), aux-free", "val avg")].mean == pytest.approx(4.3)
    assert bal.cells[("DU (r=0.5)", "val avg")].n == 3
    import matplotlib.pyplot as plt

    drawn = {}
    real_save = plt.Figure.savefig
    monkeypatch.setattr(plt.Figure, "savefig", lambda fig, *a, **k: drawn.update(
        {line.get_label(): line.get_ydata() for ax in fig.axes for line in ax.lines}) or real_save(fig, *a, **k))
    assert similarity(frame, curves(frame), tmp_path)
    assert set(drawn) == {"NU, G=4", "NU, G=4 VG", "DU (r=0.5), aux-free"}
    assert drawn["DU (r=0.5), aux-free"][0] == pytest.approx(1.0) and drawn["DU (r=0.5), aux-free"][-1] == \
        pytest.approx(0.2)
    frame_without = collect([tmp_path / "nothing"])
    assert similarity(frame_without, curves(frame_without), tmp_path / "empty") == []


def test_table1_cells(runs_dir):
    table = table1(collect([runs_dir]))
    assert table.rows == ["Dense", "FS", "BTX", "NU", "DU (r=0.5)", "DU (r=1)"]
    du = table.cells[("DU (r=0.5)", "val avg")]
    assert du.n == 3 and du.mean == pytest.approx(4.21) and du.sd == pytest.approx(0.01)
    assert du.text() == "4.210 ± 0.010 (3)"
    assert table.cells[("DU (r=1)", "val ja")].text() == "4.600"
    assert table.cells[("Dense", "val code")].text() == "5.200"
    assert table.cells[("FS", "val avg")].text() == "failed"
    assert table.cells[("BTX", "val avg")].text() == "incomplete"
    assert table.cells[("Dense", "routing JSD")].text() == "–"
    # DU r=0.5 beats NU (3 seeds each) by far more than the seed spread: bold
    assert table.bold["val avg"] == {"DU (r=0.5)"}
    md = table.markdown()
    assert "| DU (r=0.5) | **4.210 ± 0.010 (3)** |" in md
    assert r"\textbf{4.210 $\pm$ 0.010 (3)}" in table.latex()
    csv = table.frame().set_index("row")
    assert csv.loc["NU", "val avg n"] == 3 and csv.loc["FS", "val avg status"] == "failed"
    # runs scored during training: a column per task, their average last, higher is better; no count column
    frame = collect([runs_dir])
    scored = frame["label"].isin(["NU", "DU (r=0.5)"])
    frame.loc[scored, "metrics.eval/hellaswag"] = frame.loc[scored, "label"].map({"NU": 0.30, "DU (r=0.5)": 0.40})
    frame.loc[scored, "metrics.eval/triviaqa"] = 0.1
    frame.loc[scored, "metrics.eval/avg"] = frame.loc[scored, "label"].map({"NU": 0.20, "DU (r=0.5)": 0.25})
    frame.loc[scored, "metrics.eval/n_tasks"] = 2
    scores = table1(frame)
    headers = [header for header, _, _ in scores.columns]
    assert headers[-4:] == ["hellaswag", "triviaqa", "avg", "routing JSD"] and "n_tasks" not in headers
    assert scores.bold["avg"] == {"DU (r=0.5)"}  # higher is better
    assert scores.cells[("DU (r=0.5)", "hellaswag")].mean == pytest.approx(0.40)


def test_bold_needs_a_gap_beyond_the_seed_spread():
    close = {"a": Cell(4.20, 0.05, 3), "b": Cell(4.22, 0.05, 3)}
    far = {"a": Cell(4.00, 0.01, 3), "b": Cell(4.22, 0.01, 3)}
    single = {"a": Cell(4.0, None, 1), "b": Cell(5.0, None, 1)}
    assert best_rows(close) == set() and best_rows(far) == {"a"} and best_rows(single) == set()
    assert best_rows(far, lower_is_better=False) == {"b"}


def test_table8_rows_are_the_router_variants(runs_dir):
    make_run(runs_dir, "NU-router-uniform01-s0", "naive", router="uniform01", loss=4.9)
    table = table8(collect([runs_dir]))
    assert table.rows == ["normal:0.02", "normal:0.2887", "uniform:0.0346", "uniform:0.5", "uniform01"]
    assert table.cells[("uniform01", "val avg")].mean == pytest.approx(4.9)
    assert table.cells[("uniform:0.0346", "val avg")].n == 3
    assert table.cells[("normal:0.02", "val avg")].text() == "missing"


def test_figures_have_their_panels(runs_dir, tmp_path, monkeypatch):
    frame = collect([runs_dir])
    lines = curves(frame)
    out = tmp_path / "figs"
    paths = fig3(frame, lines, out)
    assert {p.name for p in paths} == {"fig3.png", "fig3.pdf"}
    image = matplotlib.image.imread(paths[0])
    assert image.shape[1] > image.shape[0] > 500  # a 2 x 2 grid, landscape
    assert {p.name for p in fig4(frame, lines, out)} == {"fig4.png", "fig4.pdf"}
    import matplotlib.pyplot as plt

    captured = {}
    real_save = plt.Figure.savefig

    def spy(fig, *args, **kwargs):
        captured["axes"] = [(ax.get_title(), ax.get_ylabel()) for ax in fig.axes]
        return real_save(fig, *args, **kwargs)

    monkeypatch.setattr(plt.Figure, "savefig", spy)
    fig3(frame, lines, out)
    assert [y for _, y in captured["axes"]].count("downstream score (mean of tasks)") == 0  # nothing was scored
    scored = lines.copy()
    scored["eval/avg"] = scored["val_loss"].map(lambda v: None if pd.isna(v) else 1 / v)  # on validation rows
    fig3(frame, scored, out)
    assert len(captured["axes"]) == 6  # the bottom row: score against tokens and against FLOPs
    assert [y for _, y in captured["axes"]].count("downstream score (mean of tasks)") == 2
    fig5(frame, lines, out)
    titles = [t for t, _ in captured["axes"] if t]
    assert titles == ["NU", "DU (r=0.5)", "DU (r=1)"]  # methods side by side (FS failed, BTX unfinished)
    assert sum(1 for _, y in captured["axes"] if y.startswith("layer")) == 2  # layers 0 and 1 of 2


def test_sweep_plans_stable_run_directories(tmp_path):
    plan = sweep.planned_runs("figures", "smoke", tmp_path)
    names = [run.run_dir.name for run in plan]
    assert len(names) == len(set(names)) == 8  # Table 1's runs and the r sweep, NU and DU shared
    by_name = {run.run_dir.name: run for run in plan}
    # smoke: 1 M tokens in steps of 16 x 256; the r sweep stops at 0.3 of the schedule (Fig. 4: 150B of 500B)
    per_step, full = 16 * 256, 1_000_000 // (16 * 256) * (16 * 256)
    part = int(0.3 * 1_000_000) // per_step * per_step
    assert by_name["DU-0.25-s0"].overrides == ["init=drop", "ratio=0.25", "seed=0", "train.schedule_tokens=1000000",
                                               f"train.tokens={part}", f"train.eval_tokens=[{part}]"]
    assert (by_name["DU-0.5-s0"].tokens, by_name["FS-s0"].tokens) == (full, full)  # Table 1 needs them whole
    assert all(run.schedule_tokens == 1_000_000 for run in plan)
    with pytest.raises(SystemExit, match="unknown SCALE"):
        sweep.planned_runs("table1", "huge", tmp_path)


def test_paper_budgets_of_table8_and_fig4(capsys):
    """Table 8 reads NU 'after training on 50B tokens' and Fig. 4 runs 'up to 150B tokens', both on the MoE's
    500B-token schedule (A.4): the dry run launches nothing and says so per run."""
    assert sweep.main(["table8", "--scale", "1.5b", "--dry-run", "--results", "/nonexistent"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 5 and {"name", "run_dir", "status", "overrides", "tokens", "schedule_tokens",
                                "train_flops"} <= set(lines[0])
    per_step = 1024 * 4096
    for line in lines:
        assert line["schedule_tokens"] == 500 * 10**9 and line["status"] == "missing"
        assert line["tokens"] == 50 * 10**9 // per_step * per_step
    sweep.main(["fig4", "--scale", "152m", "--dry-run", "--results", "/nonexistent"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {line["tokens"] for line in lines} == {150 * 10**9 // (512 * 4096) * (512 * 4096)}
    nu = next(line for line in lines if line["name"] == "NU")
    # NU is also Table 8's and Table 1's run: the same directory validates at 50B and 150B on its way
    assert any(o.startswith("train.eval_tokens=") and o.count(",") == 1 for o in nu["overrides"])
    assert not Path("/nonexistent").exists()


def test_sweep_launches_only_what_is_missing_and_asked_for(tmp_path, monkeypatch):
    launched = []
    monkeypatch.setattr(sweep, "launch", lambda run_dir, overrides, launcher, quiet=False:
                        launched.append((run_dir.name, overrides, quiet)) or 0)
    monkeypatch.setattr(sweep, "render", lambda *args, **kwargs: [])
    full = 12_000_000 // 4096 * 4096
    runs = tmp_path / "mini-seeds" / "runs"
    # completed (its schedule written down as whole steps, 11,997,184 of the 12 M asked): not launched again
    make_run(runs, "NU-s1", "naive", seed=1, tokens=full, schedule_tokens=full)
    make_run(runs, "FS-s1", "scratch", seed=1, tokens=full // 2, schedule_tokens=12_000_000)  # short: extended
    make_run(runs, "FS-s2", "scratch", seed=2, tokens=full, schedule_tokens=12_000_000, data_stream=1)  # stale
    args = ["seeds", "--scale", "mini-seeds", "--results", str(tmp_path), "--only", "NU", "--only", "FS",
            "--jobs", "2", "--override", "trainer=gpu"]
    assert sweep.main(args) == 0
    assert sorted(name for name, _, _ in launched) == ["FS-s0", "FS-s1", "FS-s2", "NU-s0", "NU-s2"]
    assert all("trainer=gpu" in o and f"train.tokens={full}" in o and quiet for _, o, quiet in launched)
    assert (runs / "FS-s1" / "results.json").is_file()  # extended in place (launch passes resume=true)
    assert not (runs / "FS-s2").exists() and (tmp_path / "mini-seeds" / "stale" / "FS-s2" / "results.json").is_file()
    launched.clear()  # --seed narrows what --only asks for: one seed of the two runs left to launch
    assert sweep.main([*args, "--seed", "2"]) == 0
    assert sorted(name for name, _, _ in launched) == ["FS-s2", "NU-s2"]
    with pytest.raises(SystemExit, match="not a run of seeds"):
        sweep.main(["seeds", "--only", "DU-2"])
    with pytest.raises(SystemExit, match="--seed 3: not a seed of SCALE=mini-seeds"):
        sweep.main(["seeds", "--scale", "mini-seeds", "--seed", "3"])
    with pytest.raises(SystemExit, match="--jobs applies to --launcher local"):
        sweep.main(["seeds", "--jobs", "2", "--launcher", "slurm"])


def test_at_budget_reads_each_run_where_its_schedule_says(tmp_path):
    from analysis.collect import at_budget

    root = tmp_path / "runs"
    # 100 steps of 100 tokens; validation rows every 50 steps (make_run)
    make_run(root, "NU-s0", "naive", tokens=10000, schedule_tokens=10000)
    make_run(root, "DU-0.5-s0", "drop", ratio=0.5, tokens=10000, schedule_tokens=20000)
    runs = collect([root])
    at, lines = at_budget(runs, curves(runs), 0.5)
    nu, du = (at[at["run_id"] == n].iloc[0] for n in ("NU-s0", "DU-0.5-s0"))
    # NU: half its schedule is step 50, whose validation row has loss 4 + 1 - 0.5
    assert (nu["status"], nu["tokens"], nu["metrics.val_loss"]) == ("completed", 5000, pytest.approx(4.5))
    assert nu["train_flops"] == pytest.approx(0.5e9)
    assert lines[lines["run_id"] == "NU-s0"]["step"].max() == 50
    # DU: half of a 20000-token schedule is step 100, the end of what it has run so far
    assert (du["tokens"], du["metrics.val_loss"]) == (10000, pytest.approx(4.0))
    at, _ = at_budget(runs, curves(runs), 0.3)  # step 30 / 60: never validated there
    assert set(at["status"]) == {"short"} and at["metrics.val_loss"].isna().all()


def test_collect_cli_with_no_runs_is_one_clear_error(tmp_path, capsys):
    from analysis.collect import main

    assert main([str(tmp_path / "nothing")]) == 1
    assert "no run directories" in capsys.readouterr().err


def test_seeds_table_pairs_runs_by_seed(runs_dir):
    table = seeds(collect([runs_dir]))
    assert table.rows[:6] == ["Dense", "FS", "BTX", "NU", "DU (r=0.5)", "DU (r=1)"]
    assert table.cells[("FS − NU", "val avg")].n == 0  # FS failed: nothing to pair
    diff = table.cells[("DU (r=0.5) − NU", "val avg")]
    # DU = NU - 0.3 in every seed: the paired difference has no spread although each method has one
    assert diff.n == 3 and diff.mean == pytest.approx(-0.3) and diff.sd == pytest.approx(0.0, abs=1e-12)
    assert table.cells[("DU (r=1) − NU", "val avg")].n == 1  # only seed 0 has both
    verdict = next(n for n in table.notes if n.startswith("DU (r=0.5) − NU"))
    assert "same sign in 3/3" in verdict and "beats the seed spread" in verdict
    assert any(n.startswith("DU (r=1) − NU") and "no verdict" in n for n in table.notes)
    without_nu = collect([runs_dir]).query("label != 'NU'")
    assert seeds(without_nu).cells[("DU (r=0.5) − NU", "val avg")].n == 0  # no reference runs: nothing to pair
    against_du = seeds(collect([runs_dir]), "DU (r=0.5)", differences_only=True)
    assert against_du.rows == ["FS − DU (r=0.5)", "BTX − DU (r=0.5)", "NU − DU (r=0.5)", "DU (r=1) − DU (r=0.5)"]
    assert against_du.cells[("NU − DU (r=0.5)", "val avg")].mean == pytest.approx(0.3)


def test_seeds_table_leaves_out_runs_stopped_at_another_budget(runs_dir):
    make_run(runs_dir, "DU-0.1-s0", "drop", ratio=0.1, tokens=3000, schedule_tokens=10000, loss=3.0)
    table = seeds(collect([runs_dir]))
    assert "DU (r=0.1)" not in table.rows and "DU (r=0.1) − NU" not in table.rows
    assert any("another budget" in n and "DU (r=0.1)" in n for n in table.notes)
    assert table.cells[("DU (r=0.5) − NU", "val avg")].n == 3


def test_seeds_verdict_when_the_gap_is_within_the_spread(tmp_path):
    root = tmp_path / "runs"
    for s, (nu, du) in enumerate([(4.50, 4.48), (4.40, 4.41), (4.60, 4.55)]):
        make_run(root, f"NU-s{s}", "naive", seed=s, loss=nu)
        make_run(root, f"DU-0.5-s{s}", "drop", ratio=0.5, seed=s, loss=du)
    verdict = next(n for n in seeds(collect([root])).notes if n.startswith("DU (r=0.5) − NU"))
    assert "does not beat the seed spread" in verdict and "same sign in 2/3" in verdict
    # differences -0.02, +0.01, -0.05: mean -0.02, sd 0.03, t = -0.02 / (0.03 / sqrt 3) = -1.2
    assert "paired t = -1.2 (not significant" in verdict


def test_seed_gap_plots_the_paired_difference(runs_dir, tmp_path, monkeypatch):
    runs = collect([runs_dir])
    drawn = {}

    def spy(fig, out_dir, name):
        drawn[name] = {line.get_label(): (line.get_xdata(), line.get_ydata()) for line in fig.axes[0].lines}
        return []
    monkeypatch.setattr("analysis.figures._save", spy)
    seed_gap(runs, curves(runs), tmp_path)
    x, y = drawn["seed_gap"]["DU (r=0.5) (n=3)"]
    assert list(x) == [0.0, 0.005, 0.01] and y == pytest.approx([-0.3, -0.3, -0.3])


def test_a_partial_rerun_keeps_older_runs_labelled_and_never_pairs_across_stream_versions(runs_dir, tmp_path,
                                                                                          monkeypatch, capsys):
    """runs_dir's NU and DU r=0.5 are a version-2 rerun; DU r=1 over three seeds, and an older NU-s0, are version-1
    runs collected earlier (a committed runs.csv). The kept DU r=1 rows are labelled as version 1, the rerun NU-s0
    replaces the old one, and neither the seeds table nor the seed-gap figure pairs a version-1 run with a version-2
    seed (seed s orders the data differently in each version)."""
    old = tmp_path / "old"
    for s in (0, 1, 2):
        make_run(old, f"DU-1.0-s{s}", "drop", ratio=1.0, seed=s, loss=4.4, data_stream=1)
    make_run(old, "NU-s0", "naive", loss=9.0, data_stream=1)
    assert not any("streams]" in l for l in collect([old], tmp_path / "old.csv")["label"])  # one version: no mark
    (runs_dir / "DU-1.0-s0").rename(tmp_path / "moved-aside")  # the rerun did not include it
    runs = collect([runs_dir], keep=[tmp_path / "old.csv"])
    assert "kept from" in capsys.readouterr().err
    assert sorted(runs.loc[runs["label"] == "DU (r=1) [v1 streams]", "seed"]) == [0, 1, 2]
    assert sorted(runs.loc[runs["label"] == "NU", "metrics.val_loss"]) == pytest.approx([4.5, 4.51, 4.52])
    assert not (runs["label"] == "NU [v1 streams]").any()
    table = seeds(runs)
    assert "DU (r=1) [v1 streams] − NU" not in table.rows and "Dense [v1 streams] − NU" not in table.rows
    assert any(n.startswith("Not paired with NU") and n.endswith(": DU (r=1) [v1 streams].") for n in table.notes)
    assert table.cells[("DU (r=0.5) − NU", "val avg")].n == 3
    assert table1(runs).rows.index("DU (r=1) [v1 streams]") == table1(runs).rows.index("DU (r=1)") + 1
    drawn = {}
    monkeypatch.setattr("analysis.figures._save", lambda fig, out_dir, name: drawn.update(
        {name: [line.get_label() for ax in fig.axes for line in ax.lines]}) or [])
    seed_gap(runs, curves(runs), tmp_path)
    assert "DU (r=0.5) (n=3)" in drawn["seed_gap"] and not any("v1" in l for l in drawn["seed_gap"])
    # rendered from a fresh clone: only kept rows, whose curves stayed with their run directories elsewhere
    drawn.clear()
    (tmp_path / "no-runs").mkdir()
    old.rename(tmp_path / "elsewhere")
    kept_only = collect([tmp_path / "no-runs"], keep=[tmp_path / "old.csv"])
    assert len(kept_only) == 4 and fig3(kept_only, curves(kept_only), tmp_path) == []
    assert seed_gap(kept_only, curves(kept_only), tmp_path) == [] and not drawn
    assert "no learning curves" in capsys.readouterr().out
    from analysis import collect as collect_module
    assert collect_module.main([str(runs_dir), "--keep", str(tmp_path / "nope.csv")]) == 1
    assert "--keep" in capsys.readouterr().err


def test_the_scoring_share_reads_each_launch_of_a_resumed_run(tmp_path):
    """Two launches: the first's clock reaches 100 s (a scoring of 10 s at step 10 inside it), the resumed one's
    60 s (one of 10 s at step 20); scorings at step 0 (5 s) and at the last step (5 s) fall outside both clocks. Wall
    time 100 + 60 + 5 + 5 = 170 s, scoring 30 s: share 30/170 (one launch's clock, or the largest, would give more)."""
    rows = ["step,tokens,train_loss,val_loss,eval/avg,eval_s,elapsed_s", "0,0,,5.0,0.3,5,",
            "10,100,4.0,,,,50", "10,100,,4.5,0.4,10,", "15,150,3.9,,,,100",
            "20,200,3.8,,,,30", "20,200,,4.2,0.5,10,", "30,300,3.7,,,,60", "30,300,,4.1,0.6,5,"]
    make_run(tmp_path, "DU-0.5-s0", "drop", ratio=0.5)
    (tmp_path / "DU-0.5-s0" / "metrics.csv").write_text("\n".join(rows) + "\n")
    run = collect([tmp_path]).set_index("run_id").loc["DU-0.5-s0"]
    assert run["metrics.eval_total_s"] == 30 and run["metrics.eval_share"] == pytest.approx(30 / 170)
    (tmp_path / "DU-0.5-s0" / "metrics.csv").write_text("\n".join(rows[:2]) + "\n")  # started: step 0 scored only
    run = collect([tmp_path]).set_index("run_id").loc["DU-0.5-s0"]
    assert run["metrics.eval_total_s"] == 5 and pd.isna(run.get("metrics.eval_share"))  # no wall time yet to share


def _prose_runs(**extra):
    """A: 1.0, 2.0, 1.0 and B: 0.5, 1.0, 1.5 on seeds 0, 1, 2 (B's rows stored in reverse seed order, so pairing by
    row order instead of by seed gives other differences): A − B by seed is +0.5, +1.0, −0.5."""
    rows = [{"label": "A", "seed": s, "metrics.val_loss": v} for s, v in zip((0, 1, 2), (1.0, 2.0, 1.0))]
    rows += [{"label": "B", "seed": s, "metrics.val_loss": v} for s, v in zip((2, 1, 0), (1.5, 1.0, 0.5))]
    frame = pd.DataFrame(rows).assign(role="run", status="completed", total_params=8_668_288, lr=0.002, **extra)
    return lambda scale: frame


def test_prose_paired_statistics_pair_by_seed_with_the_sample_spread():
    from analysis import prose
    runs_of = _prose_runs()
    compute = lambda expr: prose.compute(expr, runs_of)
    assert compute("paired s | A | B | val_loss | 3") == "+0.333 ± 0.764"  # sd with n - 1; n would give 0.624
    assert compute("perseed s | A | B | val_loss | 1") == "+0.5 / +1.0 / \u22120.5"
    assert compute("t s | A | B | val_loss") == "0.8"  # 0.333 / (0.764 / sqrt 3) = 0.756
    assert compute("signs s | A | B | val_loss") == "2/3"
    assert compute("tcrit s | A | B") == "4.30"
    assert compute("sd s | B | val_loss | 3") == "0.500"
    assert compute("mean s \\| A \\| val_loss \\| 2") == "1.33"  # in a table cell, escaped pipes separate
    assert compute('calc s | .2f | max(low("A", "metrics.val_loss"), high("B", "metrics.val_loss"))') == "1.50"
    assert compute('calc s | .0f | count("A")') == "3"
    assert compute("value s | A | total_params") == "8,668,288"
    assert compute("value s | A | total_params | .2f | 1e-6") == "8.67"
    assert compute("value s | A | lr | g") == "0.002"
    assert compute("ratio s | A | B | metrics.val_loss | 3") == "1.333"
    assert compute('calc s | .1f | 100 * gap("B", "A", "val_loss") / mean("A", "val_loss")') == "\u221225.0"
    with pytest.raises(prose.ProseError, match="not"):
        compute('calc s | .1f | __import__("os").getpid()')
    with pytest.raises(prose.ProseError, match="not paired"):
        prose.compute("paired s | A | B | val_loss | 3",
                      _prose_runs(data_stream_version=[1, 1, 1, 2, 2, 2]))


def test_prose_constants_are_exempt_and_nothing_else_is():
    from analysis import prose
    text = ("<!-- prose: checked -->In sections <!--k:the paper's section-->5.1<!--/k--> and 5.4, "
            "<!--n:mean s | A | val_loss | 2-->1.33<!--/n--> at 5 %.<!-- end prose -->")
    assert prose.untraced(text) == ["5.4", "5 %"]


def test_report_tables_are_rerendered_from_the_committed_runs(runs_dir, tmp_path):
    results = tmp_path / "results"
    frame = collect([runs_dir], results / "tiny" / "runs.csv")
    seed_gap(frame, curves(frame), results / "tiny")
    doc = tmp_path / "docs" / "report.md"
    doc.parent.mkdir()
    doc.write_text("# Report\n<!-- table: seeds @ tiny -->\nstale\n<!-- end table -->\n"
                   "![gap](report/tiny-seed_gap.png)\n")
    report.update(doc, results)
    assert report.check(doc) == []
    report.update(doc, tmp_path / "elsewhere")  # no runs of that scale here: the committed ones stay
    assert report.check(doc) == []
    assert "| DU (r=0.5) − NU |" in doc.read_text() and (tmp_path / "docs" / "report" / "tiny-runs.csv").is_file()
    doc.write_text(doc.read_text().replace("-0.300", "-0.400"))  # a hand-edited number
    problems = report.check(doc)
    assert len(problems) == 1 and "-0.400" in problems[0]
    (tmp_path / "docs" / "report" / "tiny-seed_gap.png").unlink()
    assert any("missing" in p for p in report.check(doc))


def test_prose_numbers_are_rendered_from_the_runs_and_a_typed_one_fails_the_check(runs_dir, tmp_path):
    """DU(0.5) has seeds at 4.20, 4.21, 4.22 and NU at 4.50, 4.51, 4.52 (runs_dir): their gap from unrounded means
    is -0.300; a number typed by hand, or bound but edited, fails `report check`."""
    results = tmp_path / "results"
    collect([runs_dir], results / "tiny" / "runs.csv")
    doc = tmp_path / "docs" / "report.md"
    doc.parent.mkdir()
    gap = "<!--n:gap tiny | DU (r=0.5) | NU | val_loss | 3-->stale<!--/n-->"
    mean = "<!--n:mean tiny | NU | val_loss | 2-->?<!--/n-->"
    doc.write_text(f"# Report\n<!-- prose: checked -->\nDU(0.5) - NU is {gap}; NU averages {mean} over 3 seeds "
                   "(see `val 4.5`).\n<!-- end prose -->\nOutside: 0.123 is not checked.\n")
    report.update(doc, results)
    text = doc.read_text()
    assert "-->\u22120.300<!--/n-->" in text and "-->4.51<!--/n-->" in text
    assert report.check(doc) == []
    doc.write_text(text.replace("\u22120.300", "\u22120.301"))  # a bound number edited by hand
    assert "differ" in report.check(doc)[0]
    doc.write_text(text.replace("over 3 seeds", "over 3 seeds, sd 0.01"))  # a typed decimal in checked prose
    assert report.check(doc) == ["the checked prose types the number '0.01': bind it to its computation "
                                 "(<!--n:...-->, analysis/prose.py) or leave it out"]
    doc.write_text(text.replace("gap tiny", "gapp tiny"))
    with pytest.raises(SystemExit, match="unknown computation"):
        report.check(doc)


def test_the_mini_reproduction_report_matches_its_runs():
    doc = Path(__file__).resolve().parents[1] / "docs" / "mini-reproduction.md"
    assert report.check(doc) == []
