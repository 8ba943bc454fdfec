#!/usr/bin/env python
"""Does a carried adapter help? Trains small bases of several families on one synthetic corpus,
a task LoRA on each, carries every source's LoRA into every other base with modelforge in every
applicable `[adapter.map]` mode, and measures how much of the target's own LoRA's gain each
carried adapter keeps, beside the transfer report's numbers and candidate predictors.

    .venv/bin/python experiments/transfer/run.py [--reduced] [--out DIR] [--cache DIR]

Writes DIR/results.json and DIR/results.md (default: experiments/transfer/). Trained models and
LoRAs are cached under --cache (default target/transfer-exp/) by a key of their settings.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

from measure import (Probe, auc, layer_pairs, overlap_in_any_mode, linear_cka, mean_cosine, projection,  # noqa: E402
                     residual_map, spearman, text_logprob)
from world import make_data  # noqa: E402
from zoo import Spec, Training, Zoo  # noqa: E402

import transformers  # noqa: E402
import warnings  # noqa: E402

transformers.utils.logging.disable_progress_bar()
warnings.filterwarnings("ignore", category=FutureWarning)


def spec(name, hidden, layers, heads, inter, seed, steps, family="llama", **kw) -> Spec:
    return Spec(name, family, hidden, layers, heads, inter, seed, steps, **kw)


def derived(name, parent: Spec, kind: str, seed: int = 0, steps: int = 0, lr: float = 0.0, **shape) -> Spec:
    """A model made from `parent` (see Zoo._control): same shape unless `shape` says otherwise."""
    dims = dict(hidden=parent.hidden, layers=parent.layers, heads=parent.heads, intermediate=parent.intermediate)
    dims.update(shape)
    return Spec(name, "phi3" if kind == "relaid" else "llama", dims["hidden"], dims["layers"], dims["heads"],
                dims["intermediate"], seed, steps, control=kind, parent=parent.name, lr=lr,
                head_dim=parent.hidden // parent.heads)


def variants():
    """The two sizes of the experiment: the models, which of them carry their LoRA to the others
    (`sources`; every model is a target), and the training settings."""
    steps = 1500
    a = spec("llama-a", 96, 3, 6, 256, 0, steps)
    full = dict(
        people=48, length=48, eval_batches=4,
        training=Training(batch=32, lr=3e-3, lora_rank=8, lora_steps=300, lora_lr=3e-3),
        models=[a, spec("llama-b", 96, 3, 6, 256, 1, steps),
                spec("llama-narrow", 64, 3, 4, 176, 2, steps),
                spec("llama-shallow", 96, 2, 6, 256, 3, steps),
                spec("phi3", 96, 3, 6, 256, 4, steps, family="phi3"),
                spec("neox", 96, 3, 6, 256, 5, steps, family="gpt_neox", renumber=11),
                spec("gpt2", 96, 3, 6, 256, 6, steps, family="gpt2", renumber=12),
                derived("llama-a-tuned", a, "tuned", seed=21, steps=200, lr=1e-3),
                derived("llama-a-drifted", a, "tuned", seed=22, steps=1000, lr=3e-3),
                derived("llama-a-sliced", a, "sliced", seed=23, steps=300, lr=1e-3, hidden=72),
                derived("llama-a-dropped", a, "dropped", seed=24, steps=300, lr=1e-3, layers=2),
                derived("llama-a-relaid", a, "relaid"), derived("llama-a-rotated", a, "rotated", seed=9)],
        sources=["llama-a", "llama-b", "llama-narrow", "llama-shallow", "phi3", "neox", "gpt2", "llama-a-drifted"])
    steps = 400
    a = spec("llama-a", 48, 2, 3, 128, 0, steps)
    reduced = dict(
        people=24, length=32, eval_batches=2,
        training=Training(batch=16, lr=4e-3, lora_rank=8, lora_steps=150, lora_lr=4e-3),
        models=[a, spec("llama-b", 48, 2, 3, 128, 1, steps),
                spec("llama-narrow", 32, 2, 2, 96, 2, steps, renumber=11),
                derived("llama-a-tuned", a, "tuned", seed=21, steps=100, lr=1e-3),
                derived("llama-a-relaid", a, "relaid"), derived("llama-a-rotated", a, "rotated", seed=9)],
        sources=["llama-a", "llama-b", "llama-narrow"])
    return {"full": full, "reduced": reduced}


# --- the transfer report, read ------------------------------------------------------------------

def read_report(out: Path) -> tuple[list[dict], dict]:
    """transfer.json's module rows, and what it says of the adapter: its transfer figure, the
    effect it keeps on the examples and its verdict, the energy kept and subspace overlap (means
    over the modules fused, a module moved whole counting as energy 1), the embedding fit's
    residual (align), the fraction fused."""
    report = json.loads((out / "transfer.json").read_text())
    (adapter,) = report["adapters"]
    modules = report["modules"]
    fits = [r["residual_fit"] for r in modules if r.get("residual_fit") is not None]
    return modules, dict(
        energy_kept=adapter["energy"], subspace_overlap=adapter.get("overlap"),
        embedding_residual=sum(fits) / len(fits) if fits else None,
        modules_carried=adapter["fused"] / adapter["modules"],
        report_summary=adapter.get("transfer"), verdict=adapter["verdict"],
        effect_kept=(adapter.get("effect") or {}).get("kept"),
        weights_verdict=weights_verdict(adapter.get("transfer")))


# The report's verdicts, ranked: from the effect kept on the examples (the recipes here give
# them), and the one it gives from the weights alone (without examples).
VERDICTS = ("none of its effect on the examples",
            "little of its effect on the examples: no more than perturbing the base does",
            "keeps part of its effect on the examples", "keeps its effect on the examples")
WEIGHTS_VERDICTS = ("unrelated bases: expect nothing", "partial", "close to the source")


def weights_verdict(transfer: float | None) -> str | None:
    """The verdict the report gives without examples (src/plan/transfer.rs: 0.8 and 0.2)."""
    if transfer is None:
        return None
    return WEIGHTS_VERDICTS[2 if transfer >= 0.8 else 1 if transfer >= 0.2 else 0]


# --- the experiment ------------------------------------------------------------------------------

def mode_name(dims: str, layers: str) -> str:
    if dims == "exact" and layers == "same":
        return "copied unchanged"
    return dims if layers == "same" else f"{dims}, layers {layers}"


def snapshot(binary: Path, into: Path) -> Path:
    """modelforge and its engine, hard-linked (else copied) into `into`, so that a `cargo build`
    replacing them during the run does not pull them from under it."""
    engine = binary.with_name("modelforge-engine")
    for _ in range(120):  # a build in progress removes them for a moment
        if binary.exists() and engine.exists():
            break
        time.sleep(1)
    stat = binary.stat()
    folder = into / f"{stat.st_ino}-{stat.st_size}-{stat.st_mtime_ns}"
    if not (folder / engine.name).exists():
        tmp = into / f".tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for f in (binary, engine):
            try:
                os.link(f, tmp / f.name)
            except OSError:
                shutil.copy2(f, tmp / f.name)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    return folder / binary.name


def build(binary: Path, work: Path, source: str, target: str, dirs, lora: Path, dims: str, layers: str,
          examples: Path):
    slug = f"{source}__{target}__{dims}-{layers}"
    recipe = work / "recipes" / f"{slug}.toml"
    out = work / "out" / slug
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(
        f'[base]\npath = "{dirs[target]}"\n\n[[adapter]]\npath = "{lora}"\nsource = "{dirs[source]}"\n'
        f'examples = "{examples}"\n\n'
        f'[adapter.map]\nlayers = "{layers}"\ndims = "{dims}"\n\n[output]\npath = "{out}"\n')
    run = subprocess.run([str(binary), "build", str(recipe), "--cache", str(work / "modelforge-cache"), "--quiet"],
                         capture_output=True, text=True, timeout=600)
    if run.returncode != 0:
        message = " ".join(run.stderr.replace("│", " ").split())
        return None, message[:300]
    return out, None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reduced", action="store_true", help="the small version (under 3 minutes)")
    parser.add_argument("--smoke", action="store_true",
                        help="check the pipeline end to end: every training 50 times shorter (results mean nothing)")
    parser.add_argument("--out", type=Path, default=HERE, help="where results.json and results.md go")
    parser.add_argument("--cache", type=Path, default=REPO / "target" / "transfer-exp")
    parser.add_argument("--bin", type=Path, default=Path(os.environ.get("MODELFORGE_BIN", REPO / "target" / "debug" / "modelforge")))
    args = parser.parse_args(argv)
    started = time.time()
    variant = "reduced" if args.reduced else "full"
    v = variants()[variant]
    if args.smoke:
        from dataclasses import replace
        variant += "-smoke"
        v["models"] = [replace(m, steps=max(1, m.steps // 50)) if m.steps else m for m in v["models"]]
        v["training"] = replace(v["training"], lora_steps=max(2, v["training"].lora_steps // 50))
    binary = snapshot(args.bin.resolve(), args.cache / "bin")
    say = lambda *m: print(f"[{time.time() - started:6.1f}s]", *m, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)

    data = make_data(v["people"], v["length"])
    say(f"{variant}: {len(data.vocab)} words, {v['people']} people")
    zoo = Zoo(args.cache / variant, data, v["training"], say)
    for spec in v["models"]:
        zoo.add(spec)
    names = list(zoo.specs)
    sources = v["sources"]
    loras = {n: zoo.lora(n) for n in names}
    say("models and LoRAs ready; trained now:", ", ".join(zoo.trained_now) or "nothing (all cached)")

    n_eval = v["eval_batches"]
    task_eval = data.task(seed=3000, count=n_eval, size=16, held_out=True)  # people the LoRAs never saw
    corpus_eval = data.pretraining(seed=4000, count=n_eval, size=16)
    calibration = data.pretraining(seed=5000, count=1, size=16)[0]  # plain corpus text
    examples = data.task(seed=6000, count=1, size=16, held_out=False)[0]  # the adapter's own kind of text

    base = {}
    for i, n in enumerate(names):
        perm = zoo.permutation(n)
        p, d, rnd = Probe(zoo.dirs[n], perm), Probe(zoo.dirs[n], perm, loras[n]), Probe(zoo.dirs[n], perm, loras[n])
        rnd.randomize(seed=100 + i)
        lp_c, lp_e = p.logprobs(calibration), p.logprobs(examples)
        (task, task_acc), (corpus, _) = p.scores(task_eval), p.scores(corpus_eval)
        (task_d, task_acc_d), (corpus_d, _) = d.scores(task_eval), d.scores(corpus_eval)
        (task_r, task_acc_r), (corpus_r, _) = rnd.scores(task_eval), rnd.scores(corpus_eval)
        base[n] = dict(task=task, task_acc=task_acc, corpus=corpus, task_direct=task_d, task_acc_direct=task_acc_d,
                       corpus_direct=corpus_d, random=(task_r, task_acc_r, corpus_r), lp_c=lp_c, lp_e=lp_e,
                       effect_c=d.logprobs(calibration) - lp_c, effect_e=d.logprobs(examples) - lp_e,
                       text_e=text_logprob(lp_e, examples),
                       text_effect_e=text_logprob(d.logprobs(examples), examples) - text_logprob(lp_e, examples),
                       streams=p.streams(calibration), emb=p.embeddings(), layers=p.layers,
                       hidden=p.model.config.hidden_size)
        say(f"{n}: task loss {task:.3f} -> {task_d:.3f} with its own LoRA ({task_r:.3f} with random directions), "
            f"accuracy {task_acc:.3f} -> {task_acc_d:.3f}; corpus loss {corpus:.3f} -> {corpus_d:.3f}")

    def measured(t: str, mode: str, source: str, task: float, acc: float, corpus: float) -> dict:
        bt = base[t]
        return dict(source=source, target=t, mode=mode,
                    gain_fraction=(bt["task"] - task) / (bt["task"] - bt["task_direct"]),
                    harm=corpus - bt["corpus"],
                    accuracy_fraction=(acc - bt["task_acc"]) / (bt["task_acc_direct"] - bt["task_acc"]),
                    task_loss=task, task_accuracy=acc, corpus_loss=corpus,
                    energy_kept=None, subspace_overlap=None, embedding_residual=None)

    from safetensors.torch import load_file
    weights = {n: (load_file(zoo.dirs[n] / "model.safetensors"),
                   "phi3" if zoo.specs[n].control == "relaid" else zoo.specs[n].family, zoo.specs[n].heads)
               for n in names}

    work = args.cache / variant / "work"
    # The examples the report scores: the adapter's own kind of text, one per line.
    work.mkdir(parents=True, exist_ok=True)
    examples_file = work / "examples.txt"
    examples_file.write_text("".join(" ".join(data.vocab.words[i] for i in text) + "\n" for text in examples.tolist()))
    rows, skipped = [], []
    for t in names:
        b = base[t]
        rows.append({**measured(t, "direct LoRA", t, b["task_direct"], b["task_acc_direct"], b["corpus_direct"]),
                     "verdict": "trained on this base"})
        rows.append({**measured(t, "random directions", t, *b["random"]),
                     "verdict": "control: the direct LoRA's sizes, random directions"})
    for s in sources:
        for t in names:
            if s == t:
                continue
            bs, bt = base[s], base[t]
            rows.append({**measured(t, "no adapter", s, bt["task"], bt["task_acc"], bt["corpus"]), "verdict": "no adapter"})
            layer_modes = ["same"] if bs["layers"] == bt["layers"] else ["truncate", "interpolate"]
            wide = "exact" if bs["hidden"] == bt["hidden"] else ("truncate" if bt["hidden"] < bs["hidden"] else "pad")
            for layers in layer_modes:
                for dims in (wide, "align"):
                    mode = mode_name(dims, layers)
                    out, error = build(binary, work, s, t, zoo.dirs, loras[s], dims, layers, examples_file)
                    if out is None:
                        error = error.replace(str(args.cache), "<cache>")
                        skipped.append(dict(source=s, target=t, mode=mode, reason=error))
                        say(f"{s} -> {t} [{mode}]: not applicable: {error[:120]}")
                        continue
                    report, figures = read_report(out)
                    fused = Probe(out, zoo.permutation(t))
                    (task, acc), (corpus, _) = fused.scores(task_eval), fused.scores(corpus_eval)
                    row = {**measured(t, mode, s, task, acc, corpus), **figures}
                    # Candidate predictors.
                    r = residual_map(bs["emb"][0], bt["emb"][0], dims)
                    pairs = layer_pairs(report, bs["layers"], bt["layers"])
                    row["embedding_agreement"] = mean_cosine(bs["emb"][0] @ r.T, bt["emb"][0])
                    row["unembedding_agreement"] = mean_cosine(bs["emb"][1] @ r.T, bt["emb"][1])
                    row["stream_agreement"] = (sum(mean_cosine(bs["streams"][i] @ r.T, bt["streams"][j]) for i, j in pairs)
                                               / len(pairs)) if pairs else 0.0
                    row["stream_cka"] = (sum(linear_cka(bs["streams"][i], bt["streams"][j]) for i, j in pairs)
                                         / len(pairs)) if pairs else 0.0
                    # modelforge's overlap recomputed here from the weights: a check on the report.
                    row["overlap_check"] = overlap_in_any_mode(report, weights[s], weights[t], r)
                    row["effect_on_text"] = projection(bs["effect_c"], fused.logprobs(calibration) - bt["lp_c"])
                    lp_fused = fused.logprobs(examples)
                    row["effect_on_examples"] = projection(bs["effect_e"], lp_fused - bt["lp_e"])
                    row["text_effect_on_examples"] = projection(
                        bs["text_effect_e"], text_logprob(lp_fused, examples) - bt["text_e"])
                    rows.append(row)
                    say(f"{s} -> {t} [{mode}]: gain {row['gain_fraction']:+.3f}, harm {row['harm']:+.3f}, "
                        f"report {row['report_summary']:.3f}, effect kept {row['effect_kept']}, ({row['verdict']}), "
                        f"stream {row['stream_agreement']:.3f}, "
                        f"effect {row['effect_on_text']:+.3f}/{row['effect_on_examples']:+.3f}")
                    shutil.rmtree(out)  # the fused model is rebuilt from modelforge's cache when needed

    carried = [r for r in rows if r["mode"] not in ("no adapter", "direct LoRA", "random directions")]
    maps_tried = try_stream_maps(rows, sources, names, zoo, loras, base, weights, measured,
                                 lambda p: (p.scores(task_eval), p.scores(corpus_eval)), say)
    aligned = [r for r in carried if r["mode"].startswith("align")]
    predictors = {
        "report_summary": ("the report's transfer figure: energy kept × overlap above √(1/8), on [0, 1]", 1),
        "effect_kept": ("the report, with `examples`: share of the source adapter's change of each example's log-likelihood the build reproduces (modelforge's engine)", 1),
        "verdict": ("the report's verdict with examples (effect kept ≥ 0.8 > ≥ 0.2 > ≥ 0.05 > less), as 3/2/1/0", 1),
        "weights_verdict": ("the report's verdict without examples (transfer figure: close ≥ 0.8 > partial ≥ 0.2 > unrelated), as 2/1/0", 1),
        "subspace_overlap": ("the report: mean subspace overlap under the mode's own map (R, or the identity cut or padded)", 1),
        "energy_kept": ("the report: mean energy kept", 1),
        "embedding_residual": ("the report: embedding fit residual, lower better (align only)", -1),
        "embedding_agreement": ("weights: mean cosine of mapped source and target embedding rows, with the mode's map", 1),
        "unembedding_agreement": ("weights: the same on output-head rows, with the map fitted on the embeddings", 1),
        "stream_agreement": ("calibration text: mean cosine of mapped source and target residual streams entering the layers the deltas land in", 1),
        "stream_cka": ("calibration text: linear CKA of those residual streams (map-free)", 1),
        "effect_on_text": ("calibration text: share of the source adapter's log-prob shift the carried one reproduces", 1),
        "effect_on_examples": ("a few of the adapter's own training examples: the same share", 1),
        "text_effect_on_examples": ("the same examples, whole texts: share of the source adapter's change of each text's log-likelihood the carried one reproduces (tokenizer-free)", 1),
    }
    # Below twice the best gain of random directions of the same size, a gain is damage, not
    # transfer: the clipped correlation ties all of those at 0.
    floor = 2 * max(r["gain_fraction"] for r in rows if r["mode"] == "random directions")
    clipped = [r["gain_fraction"] if r["gain_fraction"] > floor else 0.0 for r in carried]
    correlations = {}
    for key, (meaning, sign) in predictors.items():
        ranks = {"verdict": VERDICTS, "weights_verdict": WEIGHTS_VERDICTS}
        number = lambda r: ranks[key].index(r[key]) if key in ranks else sign * r[key]
        value = lambda rs: [None if r.get(key) is None else number(r) for r in rs]
        correlations[key] = dict(
            meaning=meaning,
            all_carried=spearman(value(carried), [r["gain_fraction"] for r in carried]),
            aligned=spearman(value(aligned), [r["gain_fraction"] for r in aligned]),
            clipped=spearman(value(carried), clipped),
            all_carried_accuracy=spearman(value(carried), [r["accuracy_fraction"] for r in carried]),
            auc_helps=auc(value(carried), [r["gain_fraction"] >= 0.5 for r in carried]),
            rows=sum(r.get(key) is not None for r in carried))
    # Would the report's figure pick the best mode? Per pair that transfers anything (some mode
    # above the damage floor): the gain of the mode with the highest transfer figure, against the best.
    by_pair: dict = {}
    for r in carried:
        by_pair.setdefault((r["source"], r["target"]), []).append(r)
    choices = []
    for (s, t), rs in by_pair.items():
        best = max(rs, key=lambda r: r["gain_fraction"])
        if best["gain_fraction"] <= floor:
            continue
        pick = max(rs, key=lambda r: (r["report_summary"], r["subspace_overlap"]))
        choices.append(dict(source=s, target=t, best=best["mode"], best_gain=best["gain_fraction"],
                            picked=pick["mode"], picked_gain=pick["gain_fraction"]))
    runtime = time.time() - started
    result = dict(rows=rows, rank_correlation=correlations["effect_kept"]["all_carried"],
                  rank_correlation_verdict=correlations["verdict"]["all_carried"],
                  rank_correlation_weights=correlations["report_summary"]["all_carried"],
                  rank_correlation_floor_tied=correlations["report_summary"]["clipped"],
                  rank_correlation_ceiling=ceiling(carried, floor),
                  correlations=correlations, maps_tried=maps_tried, damage_floor=floor, mode_choice=choices, not_applicable=skipped, variant=variant,
                  runtime_s=round(runtime, 1), trained_now=zoo.trained_now,
                  direct_gain={n: base[n]["task"] - base[n]["task_direct"] for n in names},
                  direct_accuracy_gain={n: base[n]["task_acc_direct"] - base[n]["task_acc"] for n in names},
                  models={n: dict(family=zoo.specs[n].family, hidden=base[n]["hidden"], layers=base[n]["layers"],
                                  heads=zoo.specs[n].heads, control=zoo.specs[n].control,
                                  parent=zoo.specs[n].parent) for n in names})
    (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "results.md").write_text(markdown(result))
    say(f"done: {len(carried)} carried rows, report Spearman {result['rank_correlation']} "
        f"(verdict {result['rank_correlation_verdict']}, weights alone {result['rank_correlation_weights']})")
    return 0


def try_stream_maps(rows, sources, names, zoo, loras, base, weights, measured, score, say) -> list[dict]:
    """Issue 19, item 3: `align`'s arithmetic with R fitted on hidden states of shared text, one
    map or one per layer, against R fitted on the embeddings (modelforge's), recomputed here on
    every pair of LLaMA-layout bases with as many layers. Not part of modelforge unless it helps."""
    from stream_map import carried as carry, variants
    tried = []
    for s in sources:
        for t in names:
            bs, bt = base[s], base[t]
            llama = lambda n: weights[n][1] == "llama"
            if s == t or not (llama(s) and llama(t)) or bs["layers"] != bt["layers"]:
                continue
            built = next((r for r in rows if (r["source"], r["target"], r["mode"]) == (s, t, "align")), None)
            for variant, maps in variants(bs["emb"][0], bt["emb"][0], bs["streams"], bt["streams"]).items():
                probe = Probe(zoo.dirs[t], zoo.permutation(t))
                with torch.no_grad():
                    state = probe.model.state_dict()
                    for name, w in carry(loras[s], weights[s][0], weights[t][0], maps).items():
                        state[name].copy_(w)
                (task, acc), (corpus, _) = score(probe)
                row = measured(t, variant, s, task, acc, corpus)
                tried.append(dict(source=s, target=t, map=variant, gain_fraction=row["gain_fraction"],
                                  accuracy_fraction=row["accuracy_fraction"], harm=row["harm"],
                                  modelforge_align_gain=built and built["gain_fraction"]))
            say(f"{s} -> {t} [align, maps]: " + ", ".join(f"{r['gain_fraction']:+.3f}" for r in tried[-3:])
                + (f" (modelforge's align: {built['gain_fraction']:+.3f})" if built else ""))
    return tried


def ceiling(carried: list[dict], floor: float) -> float | None:
    """The highest Spearman over every carried row that a figure can reach if it orders the rows
    above the damage floor exactly as their gains and cannot tell those under it apart (ties
    them): what a figure that predicts transfer, and not the size of a perturbation, can show."""
    gains = [r["gain_fraction"] for r in carried]
    return spearman([g if g > floor else 0.0 for g in gains], gains)


def verdict_lines(result: dict) -> list[str]:
    """What each verdict's rows kept (with examples, and from the weights alone), and how the
    weights' figure orders the rows on either side of the damage floor."""
    carried = [r for r in result["rows"] if "report_summary" in r]
    floor = result["damage_floor"]
    lines = []
    for key, names, figure, title in (("verdict", VERDICTS, "effect_kept", "effect kept"),
                                      ("weights_verdict", WEIGHTS_VERDICTS, "report_summary", "transfer figure")):
        lines += [f"| verdict ({'with examples' if key == 'verdict' else 'weights alone'}) | rows | {title} | gain kept | "
                  "accuracy kept | harm |", "|---|---|---|---|---|---|"]
        for verdict in reversed(names):
            rs = [r for r in carried if r.get(key) == verdict]
            if rs:
                span = lambda k, d=2: f"{min(r[k] for r in rs):.{d}f} to {max(r[k] for r in rs):.{d}f}"
                lines.append(f"| {verdict} | {len(rs)} | {span(figure, 3)} | {span('gain_fraction')} | "
                             f"{span('accuracy_fraction')} | {span('harm', 3)} |")
        lines.append("")
    above = [r for r in carried if r["gain_fraction"] > floor]
    below = [r for r in carried if r["gain_fraction"] <= floor]
    rho = lambda rs, key="report_summary": fmt(spearman([r.get(key) for r in rs], [r["gain_fraction"] for r in rs]))
    return lines + [f"From the weights alone: over the {len(above)} rows above the damage floor ({floor:.2f}) the transfer "
                    f"figure's Spearman is {rho(above)}; over the {len(below)} rows at or under it, {rho(below)}: there the "
                    "gain is what perturbing a base that is confidently wrong on the task buys, and it follows how far "
                    f"the carried delta moves the target's outputs (Spearman there with the harm, {rho(below, 'harm')}, "
                    f"with the effect kept on the examples, {rho(below, 'effect_kept')}), which a figure read off the "
                    "weights does not see. Hence a ceiling for the weights alone: a figure that ordered the rows above "
                    "the floor exactly as their gains and tied those under it would reach "
                    f"**{fmt(ceiling(carried, floor))}** over every carried row. The examples' effect is measured, not "
                    "read off the weights, and orders both sides.", ""]


def lineage(models: dict, n: str) -> str:
    return models[n]["parent"] or n


def maps_section(result: dict) -> list[str]:
    tried, models = result["maps_tried"], result["models"]
    variants = list(dict.fromkeys(r["map"] for r in tried))
    pairs = list(dict.fromkeys((r["source"], r["target"]) for r in tried))
    gain = {(r["source"], r["target"], r["map"]): r for r in tried}
    check = [abs(r["gain_fraction"] - r["modelforge_align_gain"]) for r in tried
             if r["map"] == variants[0] and r["modelforge_align_gain"] is not None]
    lines = ["", "## Tried: `align` with a residual map fitted on hidden states (issue 19, item 3)", "",
             "align's arithmetic recomputed in Python (stream_map.py) on every pair of LLaMA-layout bases with as many "
             "layers, with R fitted on the embedding rows (modelforge's), on the residual streams of 16 windows of "
             "corpus text entering every layer (one map), or per layer. The recomputation with modelforge's R gives "
             f"modelforge's align gain to within {max(check):.1e}." if check else "", ""]
    for related in (True, False):
        subset = [p for p in pairs if (lineage(models, p[0]) == lineage(models, p[1])) == related]
        if not subset:
            continue
        mean = lambda v, k: sum(gain[(*p, v)][k] for p in subset) / len(subset)
        lines.append(f"- {'related' if related else 'independently trained'} bases ({len(subset)} pairs), mean gain "
                     "(accuracy) kept: " + ", ".join(f"{v} {mean(v, 'gain_fraction'):.2f} ({mean(v, 'accuracy_fraction'):.2f})"
                                                      for v in variants))
    lines += ["", "| source | target | " + " | ".join(variants) + " |", "|---|---|" + "---|" * len(variants)]
    for p in pairs:
        lines.append(f"| {p[0]} | {p[1]} | " + " | ".join(f"{gain[(*p, v)]['gain_fraction']:.2f}" for v in variants) + " |")
    return lines


def fmt(x, digits=2):
    return "–" if x is None else f"{x:.{digits}f}"


def markdown(result: dict) -> str:
    trained = len(result["trained_now"])
    lines = [f"# Carried adapters: measured ({result['variant']} run, {result['runtime_s'] / 60:.1f} min, "
             f"{trained} models and LoRAs trained in it, the rest from the cache)", "",
             "Written by `experiments/transfer/run.py`; see README.md beside it for what each column means.", "",
             "## Bases", "", "| model | family | hidden | layers | heads | task gain of its own LoRA (nats) |",
             "|---|---|---|---|---|---|"]
    for n, m in result["models"].items():
        family = m["family"] + (f" ({m['control']} copy of llama-a)" if m["control"] else "")
        lines.append(f"| {n} | {family} | {m['hidden']} | {m['layers']} | {m['heads']} | {result['direct_gain'][n]:.3f} |")
    lines += ["", "## How well each number predicts the kept gain (Spearman)", "",
              "Headline, over every carried row: the report's effect kept on the examples (recipes give "
              f"`examples`, 16 texts of the task), **{fmt(result['rank_correlation'])}**; its verdict, "
              f"**{fmt(result['rank_correlation_verdict'])}**. From the weights alone (no examples): the transfer figure "
              f"{fmt(result['rank_correlation_weights'])}, with gains at the damage floor tied "
              f"{fmt(result['rank_correlation_floor_tied'])}; the most a figure read off the weights could reach over "
              f"every row: {fmt(result.get('rank_correlation_ceiling'))} (see below).", "",
              *verdict_lines(result),
              f"Columns: Spearman against gain_fraction over every carried row, over the `align` rows only, with "
              f"gains below {result['damage_floor']:.2f} (twice the best gain of random directions) tied at 0, against "
              "accuracy_fraction; and the AUC of telling rows with gain ≥ 0.5 from the rest.", "",
              "| predictor | what it is | all carried | align only | clipped | vs accuracy | AUC gain ≥ 0.5 |",
              "|---|---|---|---|---|---|---|"]
    for key, c in result["correlations"].items():
        lines.append(f"| `{key}` | {c['meaning']} | {fmt(c['all_carried'])} | {fmt(c['aligned'])} | {fmt(c['clipped'])} | "
                     f"{fmt(c['all_carried_accuracy'])} | {fmt(c['auc_helps'])} |")
    if result["mode_choice"]:
        lost = [c["best_gain"] - c["picked_gain"] for c in result["mode_choice"]]
        lines += ["", "## Choosing the mode by the report's transfer figure", "",
                  f"Over the {len(lost)} pairs where some mode keeps more than the damage floor, picking the mode with the "
                  f"highest transfer figure loses {sum(lost) / len(lost):.3f} of gain on average "
                  f"(at most {max(lost):.3f}) against the best mode.", "",
                  "| source | target | best mode | gain | picked | gain |", "|---|---|---|---|---|---|"]
        for c in result["mode_choice"]:
            lines.append(f"| {c['source']} | {c['target']} | {c['best']} | {c['best_gain']:.2f} | {c['picked']} | {c['picked_gain']:.2f} |")
    lines += ["", "## Rows", "",
              "gain: fraction of the target's own LoRA's task-loss gain kept; harm: change of the loss on held-out "
              "corpus text (nats/token); energy, overlap, residual, transfer, verdict: transfer.json's.", "",
              "| source | target | mode | gain | accuracy | harm | energy | overlap | residual | transfer | effect kept | verdict | stream | effect (text) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["mode"] == "no adapter":
            continue
        lines.append(f"| {r['source']} | {r['target']} | {r['mode']} | {fmt(r['gain_fraction'])} | {fmt(r['accuracy_fraction'])} | "
                     f"{fmt(r['harm'], 3)} | {fmt(r['energy_kept'])} | {fmt(r['subspace_overlap'])} | {fmt(r['embedding_residual'])} | "
                     f"{fmt(r.get('report_summary'))} | {fmt(r.get('effect_kept'))} | {r['verdict']} | {fmt(r.get('stream_agreement'))} | "
                     f"{fmt(r.get('effect_on_text'))} |")
    if result.get("maps_tried"):
        lines += maps_section(result)
    if result["not_applicable"]:
        lines += ["", "## Not applicable (modelforge refused)", ""]
        groups: dict = {}
        for s in result["not_applicable"]:
            code = s["reason"].split(" ")[0]
            first = groups.setdefault((s["source"], code), dict(example=s, targets=[]))
            first["targets"].append(f"{s['target']} [{s['mode']}]")
        for (source, code), g in groups.items():
            reason = g["example"]["reason"].split("╭")[0].strip()
            lines.append(f"- {source} -> {', '.join(g['targets'])}: `{code}`, e.g. {reason}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
