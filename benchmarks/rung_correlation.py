"""How honestly does a cheap run rank configurations? Rank correlation of each candidate rung with full fidelity.

    .venv/bin/python benchmarks/rung_correlation.py --dataset mnist --configs 30 --out runs/rungs-mnist.jsonl
    .venv/bin/python benchmarks/rung_correlation.py --table runs/rungs-mnist.jsonl runs/rungs-fashion-mnist.jsonl

About 30 configurations are drawn at random (seeded) from the cnn study's space. Each is trained at full fidelity
(the study's epochs on the whole training split, its one-cycle schedule) and at every candidate rung: a complete
short run (its own schedule annealed to the end) on a stratified, seeded subset of the training split for fewer
epochs. Every run of a configuration has the same seed. Results go to a JSON-lines file as they come (a killed run
resumes where it stopped); `--table` prints, for each rung and for the baseline rules, Spearman's rank correlation
with the full-fidelity accuracy and how often the rule's top third holds the full-fidelity best three.

The baselines are read from the full run's own history at no extra cost: its accuracy after epoch 1 (of the
one-cycle schedule, still warming up: what a pruner judging a trial part-way sees, and "keep the top k after one
epoch"), and after epochs 2 and 3.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import optuna
import torch

from pipeline.data.loading import prepare
from pipeline.spec import space, studies
from pipeline.training import train

# (name, share of the training split, epochs); the last is full fidelity for a study of 5 epochs.
RUNGS = (("1/8 x 1", 1 / 8, 1), ("1/4 x 1", 1 / 4, 1), ("1/4 x 2", 1 / 4, 2), ("1/1 x 1", 1.0, 1))
SUBSET_SEED = 1
LADDER = ("1/8 x 1", "1/4 x 2")  # a planned search's rungs 0 and 1 for a study of 5 epochs (search/plan.py)


# The space the configurations are drawn from: the cnn study's as it was when this measurement began, two or three
# blocks of one or two convolutions (the study has since fixed three blocks of two, on this measurement's evidence).
# Drawn in this order, they are the configurations already recorded in benchmarks/results/.
DRAWN_FIRST = {"cnn_blocks": {"type": "int", "low": 2, "high": 3}}
DRAWN_AFTER_WIDTH = {"convs_per_block": {"type": "int", "low": 1, "high": 2}}


def measured_space(spec: studies.StudySpec) -> studies.StudySpec:
    """The cnn study with the space this measurement draws from."""
    study = spec.model_dump()
    fixed = {k: v for k, v in study["fixed"].items() if k not in DRAWN_FIRST and k not in DRAWN_AFTER_WIDTH}
    rest = {k: v for k, v in study["space"].items() if k != "cnn_width"}
    drawn = {**DRAWN_FIRST, "cnn_width": study["space"]["cnn_width"], **DRAWN_AFTER_WIDTH, **rest}
    return studies.StudySpec.model_validate({**study, "fixed": fixed, "space": drawn, "baseline": []})


def configurations(spec: studies.StudySpec, count: int, seed: int) -> list[dict]:
    """`count` params drawn at random from the study's space (the same ones on every machine)."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed), direction="maximize")
    drawn = []
    for _ in range(count):
        trial = study.ask()
        drawn.append(space.suggest(spec, trial))
        study.tell(trial, 0.0)
    return drawn


def measure(dataset: str, count: int, out: Path, threads: int, policy: str | None, first: int = 0) -> None:
    spec = measured_space(studies.load("cnn"))
    data = prepare(dataset)
    done = {(r["config"], r["rung"]) for r in _read(out)}
    for index, params in enumerate(configurations(spec, count, seed=0)):
        if index < first:
            continue
        if policy is not None:
            params = {**params, "augment_policy": policy}
        seed = studies.derive_seed(spec.seed, "rungs", index)
        for name, share, epochs in (*RUNGS, ("full", 1.0, spec.epochs)):
            if (index, name) in done:
                continue
            size = None if share >= 1 else math.floor(len(data.train) * share)
            subset = data.training_subset(size, SUBSET_SEED)
            started = time.perf_counter()
            result = train.fit({**params, "epochs": epochs}, subset, seed=seed, threads=threads)
            record = {"dataset": dataset, "config": index, "rung": name, "images": len(subset.train),
                      "epochs": epochs, "seconds": round(time.perf_counter() - started, 2),
                      "precision": result.precision, "best": result.best_val_accuracy,
                      "history": [m.val_accuracy for m in result.history], "params": params}
            with out.open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"config {index} {name}: {result.best_val_accuracy:.4f} in {record['seconds']:.0f} s", flush=True)


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=lambda i: values[i])
        result = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                result[order[k]] = (i + j) / 2
            i = j + 1
        return result

    return float(torch.corrcoef(torch.tensor([ranks(a), ranks(b)]))[0, 1])


def top_hits(rule: list[float], full: list[float], keep: int, best: int = 3) -> int:
    """How many of the full-fidelity best `best` are among the rule's top `keep`."""
    kept = set(sorted(range(len(rule)), key=lambda i: -rule[i])[:keep])
    return len(kept & set(sorted(range(len(full)), key=lambda i: -full[i])[:best]))


def ladder(low: dict[int, float], high: dict[int, float], keep: int) -> dict[int, float]:
    """The planned search's ranking: the best `keep` of the low rung ranked by the high rung, above all the rest
    (ranked by the low rung). Accuracies are at most 1, so 1 + the high rung's puts the kept ones first."""
    kept = set(sorted(low, key=lambda c: -low[c])[:keep])
    return {c: 1 + high[c] if c in kept else low[c] for c in low}


def table(paths: list[Path]) -> None:
    names = [next(iter(_read(p)), {}).get("dataset", p.stem) for p in paths]
    print("| rule | cost (full = 1) | " + " | ".join(f"Spearman, {n}" for n in names)
          + " | " + " | ".join(f"best 3 in top third, {n}" for n in names) + " |")
    print("|---|---|" + "---|" * (2 * len(paths)))
    rows: dict[str, tuple[float, list[str], list[str]]] = {}
    for column, path in enumerate(paths):
        records = _read(path)
        full = {r["config"]: r for r in records if r["rung"] == "full"}
        configs = sorted(full)
        truth = [full[c]["best"] for c in configs]
        keep = max(len(configs) // 3, 1)
        epochs = len(full[configs[0]]["history"])
        rules = {f"epoch {e} of the full run": ({c: full[c]["history"][e - 1] for c in configs}, e / epochs)
                 for e in (1, 2, 3)}
        complete = {}
        for name, share, rung_epochs in RUNGS:
            found = {r["config"]: r["best"] for r in records if r["rung"] == name and r["config"] in full}
            if len(found) == len(configs):
                complete[name] = (found, share * rung_epochs / epochs)
                rules[f"complete run, {name}"] = complete[name]
        if all(name in complete for name in LADDER):
            (low, low_cost), (high, high_cost) = (complete[name] for name in LADDER)
            rules[f"the ladder: {LADDER[0]}, its best third again at {LADDER[1]}"] = (
                ladder(low, high, keep), low_cost + keep / len(configs) * high_cost)
        for name, (values, cost) in rules.items():
            rule = [values[c] for c in configs]
            entry = rows.setdefault(name, (cost, ["-"] * len(paths), ["-"] * len(paths)))
            entry[1][column] = f"{spearman(rule, truth):+.2f} ({len(configs)} configs)"
            entry[2][column] = f"{top_hits(rule, truth, keep)} of 3"
    for name, (cost, rhos, hits) in rows.items():
        print(f"| {name} | {cost:.2f} | " + " | ".join(rhos) + " | " + " | ".join(hits) + " |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--configs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--policy", default=None, help="augment_policy for every run (fashion-mnist: natural)")
    parser.add_argument("--first", type=int, default=0,
                        help="skip the configurations before this one (a second process measures the tail into "
                             "its own file; concatenate the files)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--table", type=Path, nargs="+")
    args = parser.parse_args(argv)
    if args.table:
        table(args.table)
        return
    if args.out is None:
        sys.exit("--out FILE.jsonl is needed to measure")
    measure(args.dataset, args.configs, args.out, args.threads, args.policy, args.first)


if __name__ == "__main__":
    main()
