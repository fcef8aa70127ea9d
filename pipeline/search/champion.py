"""The champion: the search's best configurations, trained again over seeds (seeds.py), and the best mean of them.

One run's validation score is partly its seed's luck, and the search's best trial is the luckiest of many, so its
score overstates what its configuration delivers. A study with a `[champion]` table (spec/tables.py's
ChampionTable) ends with this phase: the `top_k` best distinct configurations (by their search score) are trained
again, with seeds derived from (study seed, trial number, repeat), on the full epoch budget and without pruning,
until each has `seeds` runs (the search's own run counts as one).

The runs are trials of a companion Optuna study, `<study>:champion` in the same storage (seeds.py runs them).
This module reads them back: each candidate's runs and statistics, and the choice.

The choice: the best mean among the candidates that have all their runs. A candidate within one standard error
of that mean (the one-standard-error rule: too close to tell apart with this many seeds) that costs fewer FLOPs
per image wins instead. The exported weights are those of the champion's confirmation run closest to its mean:
never the search's own run, which was picked for its luck.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

from pipeline import store
from pipeline.spec import studies
from pipeline.spec.studies import ChampionTable, StudySpec

COMPANION = ":champion"  # the companion study's name: `<study>:champion` (study files may not hold a ':')
CONFIDENCE = 0.95


def champion_table(spec: StudySpec, study: optuna.Study | None = None) -> ChampionTable:
    """The study's `[champion]` table: only a study that has one has a champion phase. A planned study's stored plan
    may have fewer configurations or seeds than the file asks for (search/plan.py): those count."""
    if spec.confirmation is None:
        raise ValueError(f"study {spec.name!r} has no [champion] table, so no champion phase")
    plan = study.user_attrs.get(store.PLAN_ATTR) if study is not None else None
    if isinstance(plan, dict):
        stage = next(s for s in plan["stages"] if s["name"] == "champion")
        return spec.confirmation.model_copy(update={"top_k": stage["configs"], "seeds": stage["seeds"]})
    return spec.confirmation


def companion_name(study_name: str, suffix: str = COMPANION) -> str:
    return study_name + suffix


def rung_suffix(rung: int) -> str:
    """A planned search's rung r > 0 runs in the companion study `<study>:rung<r>` (rung 0 is the study itself)."""
    return f":rung{rung}"


def open_companion(spec: StudySpec, storage: optuna.storages.BaseStorage, study_name: str,
                   suffix: str = COMPANION) -> optuna.Study:
    """The study's champion-phase runs (or a planned search's rung), created on first use. Every run is queued, so
    the sampler never samples."""
    direction = spec.directions[0]  # "maximize" or "minimize", as Optuna takes it
    return optuna.create_study(study_name=companion_name(study_name, suffix), storage=storage, load_if_exists=True,
                               direction=direction, sampler=optuna.samplers.RandomSampler(seed=0),
                               pruner=optuna.pruners.NopPruner())


def find_companion(storage: optuna.storages.BaseStorage, study_name: str,
                   suffix: str = COMPANION) -> optuna.Study | None:
    try:
        return optuna.load_study(study_name=companion_name(study_name, suffix), storage=storage)
    except KeyError:
        return None


def stage_runs(study: optuna.Study, rung: int | None) -> list[store.TrialRecord]:
    """The runs of a planned search's stage: rung 0's are the study's own trials, rung r's those of `<study>:rung<r>`,
    the champion phase's (`rung` None) those of `<study>:champion`; [] for a stage no run has reached."""
    if rung == 0:
        return store.records(study)
    companion = find_companion(store.storage_of(study), study.study_name,
                               rung_suffix(rung) if rung is not None else COMPANION)
    return store.records(companion) if companion is not None else []


# --------------------------------------------------------------------------------------------------
# Statistics of one candidate's runs


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation and a Student-t confidence interval of the mean (None below 2 runs)."""

    n: int
    mean: float
    std: float | None
    ci_low: float | None
    ci_high: float | None
    low: float
    high: float

    @property
    def standard_error(self) -> float | None:
        return self.std / math.sqrt(self.n) if self.std is not None else None


def summarize(values: list[float], confidence: float = CONFIDENCE) -> Summary:
    from scipy.stats import t  # a second to import: only when a phase is summed up

    if not values:  # a planned search's candidate before its first full-fidelity run
        return Summary(0, math.nan, None, None, None, math.nan, math.nan)
    n, mean = len(values), statistics.fmean(values)
    if n < 2:
        return Summary(n, mean, None, None, None, min(values), max(values))
    std = statistics.stdev(values)
    half = float(t.ppf((1 + confidence) / 2, n - 1)) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half, min(values), max(values))


# --------------------------------------------------------------------------------------------------
# Candidates, their runs, the choice


@dataclass(frozen=True)
class Run:
    repeat: int  # 0: the search's own trial
    number: int  # its trial's number: in the search's study (repeat 0) or in the companion
    seed: int | None
    value: float


@dataclass
class Candidate:
    trial: store.TrialRecord  # its search trial
    rank: int  # by the search's score: 1 is the search's best
    runs: list[Run]
    summary: Summary

    @property
    def flops(self) -> int | None:
        return self.trial.flops_per_image


@dataclass
class Standings:
    """The phase's table: each candidate's runs and statistics, the champion and the run whose weights are exported."""

    study_name: str
    metric: str
    direction: str
    seeds: int
    candidates: list[Candidate]
    champion: Candidate | None = None
    exported: Run | None = None
    reason: str = ""  # how the champion was chosen, or why there is none yet
    missing: int = 0  # planned runs not done yet

    def as_dict(self) -> dict[str, Any]:
        return {
            "study": self.study_name, "metric": self.metric, "direction": self.direction, "seeds": self.seeds,
            "confidence": CONFIDENCE, "missing_runs": self.missing, "reason": self.reason,
            "champion_trial": self.champion.trial.number if self.champion else None,
            "exported": vars(self.exported) if self.exported else None,
            "candidates": [{"trial": c.trial.number, "rank": c.rank, "flops_per_image": c.flops,
                            "params": c.trial.sampled, **vars(c.summary),
                            "runs": [vars(r) for r in c.runs]} for c in self.candidates],
        }

    def rows(self) -> list[dict[str, Any]]:
        """Each candidate's figures as text, in the search's order: what every view of the table (the console, the
        markdown artifact, the report page) shows."""
        return [{"rank": str(c.rank), "trial": str(c.trial.number), "runs": str(c.summary.n),
                 "mean": f"{c.summary.mean:.4f}", "std": _maybe(c.summary.std), "interval": interval(c.summary),
                 "min": f"{c.summary.low:.4f}", "max": f"{c.summary.high:.4f}", "mflops": _mflops(c.flops),
                 "values": ", ".join(f"{r.repeat}: {r.value:.4f}" for r in c.runs), "champion": c is self.champion}
                for c in self.candidates]

    def markdown(self) -> str:
        rows = [f"# Champion of {self.study_name}: {self.metric} over {self.seeds} seeds per candidate", "",
                "| rank | trial | runs | mean | std | 95% CI | min | max | MFLOPs | values (repeat: value) |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for r in self.rows():
            rows.append(f"| {r['rank']} | {r['trial']}{' (champion)' if r['champion'] else ''} | {r['runs']} | "
                        f"{r['mean']} | {r['std']} | {r['interval']} | {r['min']} | {r['max']} | {r['mflops']} | "
                        f"{r['values']} |")
        rows += ["", self.reason]
        if self.exported is not None and self.champion is not None:
            rows.append(f"Exported weights: {describe_run(self.exported, self.champion.trial.number)}, the "
                        "confirmation run closest to the mean.")
        return "\n".join(rows) + "\n"


def interval(summary: Summary) -> str:
    if summary.ci_low is None:
        return "-"
    return f"[{summary.ci_low:.4f}, {summary.ci_high:.4f}]"


def describe_run(run: Run, of: int) -> str:
    return f"repeat {run.repeat} of trial {of} (seed {run.seed}, {run.value:.4f}; champion-phase run {run.number})"


def _maybe(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _mflops(flops: int | None) -> str:
    return "-" if not flops else f"{flops / 1e6:,.1f}"


def _flops_apart(fewer: int | None, more: int | None) -> str:
    """`58.31 M vs 58.35 M`: two FLOP counts with the fewest decimals that still tell them apart (`-`: a count
    the trial did not record)."""
    if not fewer or not more:
        return f"{_mflops(fewer)} M vs {_mflops(more)} M"
    for decimals in (1, 2, 3):
        shown = [f"{flops / 1e6:,.{decimals}f} M" for flops in (fewer, more)]
        if shown[0] != shown[1]:
            return " vs ".join(shown)
    return f"{fewer:,} vs {more:,}"


def ranked(spec: StudySpec, study: optuna.Study) -> list[store.TrialRecord]:
    """The study's distinct feasible configurations, best first by their score (the first to complete wins a tie).
    Runs of a planned search's rung are told apart by the trial they train again (`confirmation_of`)."""
    sign = -1.0 if spec.directions[0] == "maximize" else 1.0
    complete = sorted((r for r in store.records(study, (TrialState.COMPLETE,)) if r.feasible),
                      key=lambda r: (sign * r.first_value, r.completed_at, r.number))
    chosen, seen = [], set()
    for record in complete:
        key = json.dumps(record.sampled if record.confirmation_of is not None else
                         record.params if record.params is not None else record.sampled, sort_keys=True)
        if key not in seen:
            seen.add(key)
            chosen.append(record)
    return chosen


def candidates(spec: StudySpec, study: optuna.Study) -> list[store.TrialRecord]:
    """The best `top_k` distinct feasible configurations by their search score: of a planned search, by their score
    at its last rung that has runs (each as its rung-0 trial, whose number names the configuration)."""
    return rung_ranking(spec, study)[:champion_table(spec, study).top_k]


def rung_ranking(spec: StudySpec, study: optuna.Study, below: int | None = None) -> list[store.TrialRecord]:
    """The configurations of the highest rung that has runs (below rung `below`; None: of them all), best first,
    each as its rung-0 trial; the study's own ranking when no rung above 0 has runs (or it is not planned)."""
    highest = planned_rungs(study) if below is None else below
    for rung in range(highest - 1, 0, -1):
        companion = find_companion(store.storage_of(study), study.study_name, rung_suffix(rung))
        found = ranked(spec, companion) if companion is not None else []
        if found:
            numbers = [r.confirmation_of for r in found if r.confirmation_of is not None]
            return [r for n in numbers if (r := store.record(study, n)) is not None]
    return ranked(spec, study)


def planned_rungs(study: optuna.Study) -> int:
    """How many rungs the study's stored plan has (0: the study is not planned)."""
    plan = study.user_attrs.get(store.PLAN_ATTR)
    return sum(stage["name"].startswith("rung ") for stage in plan["stages"]) if isinstance(plan, dict) else 0


def repeat_seed(spec: StudySpec, trial_number: int, repeat: int) -> int:
    return studies.derive_seed(spec.seed, trial_number, repeat)


def standings(spec: StudySpec, study: optuna.Study, companion: optuna.Study | None) -> Standings:
    """The table as the stores hold it now (also what export and the report read back)."""
    seeds, direction = champion_table(spec, study).seeds, spec.directions[0]
    done: dict[tuple[int | None, int], store.TrialRecord] = {}
    for record in store.records(companion, (TrialState.COMPLETE,)) if companion is not None else []:
        done.setdefault((record.confirmation_of, record.repeat), record)  # the first if a run was done twice
    table = Standings(study.study_name, spec.metrics[0], direction, seeds, [])
    first = 0 if planned_rungs(study) else 1  # a planned search's repeat 0 is a full-fidelity run, not the trial
    for rank, trial in enumerate(candidates(spec, study), start=1):
        runs = [] if first == 0 else [Run(0, trial.number, trial.seed, trial.first_value)]
        for repeat in range(first, seeds):
            if (found := done.get((trial.number, repeat))) is not None:
                runs.append(Run(repeat, found.number, found.seed, found.first_value))
        table.candidates.append(Candidate(trial, rank, runs, summarize([r.value for r in runs])))
        table.missing += seeds - len(runs)
    table.champion, table.reason = choose(table.candidates, direction, seeds)
    if table.champion is not None:
        table.exported = closest_to_mean(table.champion, first)
    return table


def choose(found: list[Candidate], direction: str, seeds: int) -> tuple[Candidate | None, str]:
    """The best mean among candidates with all `seeds` runs, or a cheaper one within one standard error of it."""
    complete = [c for c in found if c.summary.n >= seeds]
    if not complete:
        return None, "no candidate has all its runs yet: `make search` again completes the phase"
    sign = 1.0 if direction == "maximize" else -1.0
    leader = max(complete, key=lambda c: (sign * c.summary.mean, -c.rank))
    error = leader.summary.standard_error or 0.0
    tied = [c for c in complete if sign * (leader.summary.mean - c.summary.mean) <= error * (1 + 1e-9)]
    cheapest = min(tied, key=lambda c: (c.flops or math.inf, -sign * c.summary.mean, c.rank))
    best = f"trial {leader.trial.number} has the best mean ({leader.summary.mean:.4f} over {leader.summary.n} runs)"
    if cheapest is leader or cheapest.flops == leader.flops:
        return leader, f"Champion: {best}."
    return cheapest, (f"Champion: trial {cheapest.trial.number} ({cheapest.summary.mean:.4f}): {best}, but trial "
                      f"{cheapest.trial.number} is within one standard error of it ({error:.4f}), a tie within the "
                      f"noise, and needs fewer FLOPs per image ({_flops_apart(cheapest.flops, leader.flops)}): the "
                      "cheaper model wins the tie.")


def closest_to_mean(candidate: Candidate, first: int = 1) -> Run | None:
    """The confirmation run whose value is nearest the mean (the lower repeat on a tie): a typical run's weights.
    Confirmation runs are the repeats from `first` on (0 in a planned search, where every one is a phase run)."""
    confirmations = [r for r in candidate.runs if r.repeat >= first]
    if not confirmations:
        return None
    return min(confirmations, key=lambda r: (abs(r.value - candidate.summary.mean), r.repeat))
