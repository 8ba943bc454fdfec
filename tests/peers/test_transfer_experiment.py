"""The transfer experiment (`experiments/transfer/run.py`), in its reduced form: it trains tiny
bases and task LoRAs on a synthetic corpus, carries the LoRAs with modelforge and measures what
they keep. These tests check the results file's shape and the experiment's own controls, never
its findings: a target's own LoRA keeps all of its gain and no adapter none, and the source
model itself, re-laid into Phi-3's fused layout or with its residual stream rotated, receives
the source's adapter whole (the rotated one only through `dims = "align"`), and the transfer
report says so (its overlap recomputed in Python from the weights, in every mode)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from support import BIN, REPO

RUN = REPO / "experiments" / "transfer" / "run.py"
ROW_KEYS = {"source", "target", "mode", "gain_fraction", "harm", "energy_kept", "subspace_overlap",
            "embedding_residual", "verdict"}


def run_experiment(out: Path, cache: Path) -> dict:
    if not BIN.exists():
        pytest.fail(f"modelforge binary not found at {BIN}: `cargo build` or set MODELFORGE_BIN")
    env = {**os.environ, "MODELFORGE_BIN": str(BIN), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(RUN), "--reduced", "--out", str(out), "--cache", str(cache)],
                         capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    ws = tmp_path_factory.mktemp("transfer-experiment")
    return ws, run_experiment(ws / "out", ws / "cache")


def rows(result: dict, **match) -> list[dict]:
    return [r for r in result["rows"] if all(r[k] == v for k, v in match.items())]


def one(result: dict, **match) -> dict:
    found = rows(result, **match)
    assert len(found) == 1, (match, found)
    return found[0]


def test_the_results_have_the_documented_shape(experiment):
    ws, result = experiment
    assert set(result) >= {"rows", "rank_correlation"}
    r = result["rank_correlation"]
    assert r is None or -1.0 <= r <= 1.0
    for row in result["rows"]:
        assert ROW_KEYS <= set(row), row
        assert isinstance(row["gain_fraction"], float) and isinstance(row["harm"], float), row
        assert isinstance(row["verdict"], str) and row["verdict"], row
    modes = {row["mode"] for row in result["rows"]}
    assert {"no adapter", "direct LoRA", "copied unchanged", "align"} <= modes, modes
    # One row per source, target and mode.
    keys = [(row["source"], row["target"], row["mode"]) for row in result["rows"]]
    assert len(keys) == len(set(keys))
    # Every pair carried into has its baseline.
    carried = {(row["source"], row["target"]) for row in result["rows"]
               if row["mode"] not in ("direct LoRA", "random directions", "no adapter")}
    assert carried and all(rows(result, source=s, target=t, mode="no adapter") for s, t in carried)
    for c in result["correlations"].values():
        assert all(v is None or -1.0 <= v <= 1.0 for k, v in c.items() if k in ("all_carried", "aligned"))
    md = (ws / "out" / "results.md").read_text()
    assert "Spearman" in md and "| source | target | mode |" in md


def test_the_baselines_are_what_the_fraction_is_measured_against(experiment):
    _, result = experiment
    for row in rows(result, mode="direct LoRA"):
        assert row["gain_fraction"] == pytest.approx(1.0) and row["source"] == row["target"], row
        baseline = rows(result, target=row["target"], mode="no adapter")[0]
        assert row["task_loss"] < 0.5 * baseline["task_loss"], ("the task LoRA learned the task", row, baseline)
    for row in rows(result, mode="no adapter"):
        assert row["gain_fraction"] == 0.0 and row["harm"] == 0.0, row


def test_the_source_in_another_layout_receives_the_adapter_whole(experiment):
    _, result = experiment
    for mode in ("copied unchanged", "align"):
        row = one(result, source="llama-a", target="llama-a-relaid", mode=mode)
        assert row["gain_fraction"] == pytest.approx(1.0, abs=0.05), row
        assert row["accuracy_fraction"] == pytest.approx(1.0, abs=0.05), row


def test_a_rotated_copy_of_the_source_receives_it_through_align_only(experiment):
    _, result = experiment
    aligned = one(result, source="llama-a", target="llama-a-rotated", mode="align")
    copied = one(result, source="llama-a", target="llama-a-rotated", mode="copied unchanged")
    assert aligned["gain_fraction"] >= 0.9, aligned
    assert aligned["subspace_overlap"] > 0.95 and aligned["embedding_residual"] < 0.05, aligned
    assert aligned["weights_verdict"] == "close to the source", aligned
    assert aligned["verdict"] == "keeps its effect on the examples", aligned
    assert copied["gain_fraction"] < 0.5 * aligned["gain_fraction"], (copied, aligned)
    assert copied["effect_kept"] < 0.5 * aligned["effect_kept"], (copied, aligned)
    # The candidate predictors see the rotation too: streams and weights agree only through the map.
    assert aligned["stream_agreement"] > 0.95 > copied["stream_agreement"], (aligned, copied)
    assert copied["weights_verdict"] == "unrelated bases: expect nothing", copied
    assert copied["report_summary"] < 0.2 < 0.8 < aligned["report_summary"], (copied, aligned)


def test_the_report_compares_the_bases_in_every_mode(experiment):
    """modelforge's overlap, recomputed from the weights in Python, under the map each mode uses
    (the identity, cut or padded, or R); and the copies of the source are close in every mode
    that maps them onto it."""
    _, result = experiment
    carried = [r for r in result["rows"] if "report_summary" in r]
    assert {r["mode"] for r in carried} >= {"copied unchanged", "align", "truncate"}, carried
    for row in carried:
        assert row["subspace_overlap"] is not None and row["report_summary"] is not None, row
        assert row["overlap_check"] == pytest.approx(row["subspace_overlap"], abs=1e-4), row
    for target in ("llama-a-relaid", "llama-a-tuned"):
        for mode in ("copied unchanged", "align"):
            row = one(result, source="llama-a", target=target, mode=mode)
            assert row["weights_verdict"] == "close to the source", row
            assert row["verdict"] == "keeps its effect on the examples", row


def test_the_reports_effect_on_the_examples_is_what_transformers_measures(experiment):
    """With `examples`, modelforge's engine scores the texts on four models; the same share,
    computed in Python from transformers' log-probabilities, agrees on every carried row."""
    _, result = experiment
    carried = [r for r in result["rows"] if "report_summary" in r]
    for row in carried:
        assert row["effect_kept"] == pytest.approx(row["text_effect_on_examples"], abs=1e-4), row


def test_a_rerun_reuses_the_trained_models_and_gives_the_same_rows(experiment, tmp_path):
    ws, result = experiment
    again = run_experiment(tmp_path / "again", ws / "cache")
    assert again["trained_now"] == [], again["trained_now"]
    assert again["rows"] == result["rows"]
    assert again["rank_correlation"] == result["rank_correlation"]


def test_rank_helpers():
    sys.path.insert(0, str(RUN.parent))
    from measure import auc, spearman
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2, 3], [5, 6, 7, 8]) == pytest.approx(0.9486833, abs=1e-6)
    assert spearman([1, None, 2], [1, 2, 3]) is None
    assert auc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0
    assert auc([0.5, 0.5], [True, False]) == 0.5


def test_the_maps_tried_recompute_modelforges_align(experiment):
    """Item 3's trial recomputes align's arithmetic with other residual maps: with modelforge's
    own map it must give modelforge's align gain, or the comparison would measure the copy."""
    _, result = experiment
    tried = [r for r in result["maps_tried"] if r["map"].startswith("embedding rows")]
    assert len(tried) >= 6, result["maps_tried"]
    for r in tried:
        assert r["gain_fraction"] == pytest.approx(r["modelforge_align_gain"], abs=0.01), r
    assert {r["map"] for r in result["maps_tried"]} == {
        "embedding rows (modelforge's R)", "hidden states, one map", "hidden states, a map per layer"}
