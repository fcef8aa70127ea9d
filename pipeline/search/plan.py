"""The plan of a study's minutes: which rungs run, how many configurations each, how long each takes, what is left for
the champion phase. Pure arithmetic on measured rates (training/calibration.py measures them); nothing runs here.

A planned search is successive halving over complete runs. Rung 0 trains every sampled configuration briefly: a
complete short run (its own one-cycle schedule annealed to the end) on a stratified, seeded share of the training
split. The best third of rung 0 trains again at the next rung, more images and/or epochs, and so on; the best
`top_k` of the last cheap rung go to the champion phase, which trains each at full fidelity (the study's epochs on
the whole training split) over `seeds` seeds. The ladder (`LADDER`) is the one whose rungs ranked configurations
most like full fidelity for their cost (benchmarks/rung_correlation.py, README "Cheap rungs that rank honestly").

The plan fills the minutes: after a reserve (start-up, the report) and the champion phase, rung 0 gets as many
configurations as fit, each later rung a third of the one before. Rung 0 runs on every worker at once; the later
rungs and the champion phase run one trial at a time on all the threads (fewer, longer trials: no core idles while
the last of them trains).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

# (share of the training split, epochs) of each cheap rung, lowest first; full fidelity comes after them.
LADDER: tuple[tuple[float, int], ...] = ((1 / 8, 1), (1 / 4, 2))
KEEP = 3  # each rung trains the best 1/KEEP of the one below
MIN_SUBSET_PER_CLASS = 50  # a rung's subset holds at least this many images of each class (else the whole split)
RESERVE_SECONDS = 45.0  # start-up (data, calibration), the champion's choice and the report page
RESERVE_SHARE = 0.03  # ...and this share of the minutes: estimates are estimates
MIN_FIRST_RUNG = 8  # fewer configurations than this at rung 0 is no search: the plan says so
# Rung 0 is the search's breadth: the sampler's first 10 configurations are random (TPE's start-up), so under this
# many sampled ones (the study's baselines come on top) it has barely begun to learn the space. Where the minutes
# are short, the later rungs shrink (to LEAST_LATER configurations: still a comparison) and then the champion
# phase, before rung 0 goes below it.
BROAD_FIRST_RUNG = 40
LEAST_LATER = 3
# The champion phase takes at most this share of the minutes (cut to fewer seeds, then configurations, until it
# does), so the search gets the rest: on a slow machine the study's top_k x seeds full-fidelity runs would otherwise
# leave rung 0 a handful of configurations. A fast device fills it with more configurations than top_k...
CHAMPION_SHARE = 0.4
MAX_CHAMPIONS = 8  # ...up to this many
# A later rung planned again keeps the champion phase this much more than its estimate: a run at full fidelity is
# long, and an estimate a few percent short would cost it a seed (a 30-minute fp32 run: 14.2 minutes planned for
# two runs, 15.4 needed, one trained). Once the rung's own runs on all the threads have measured the machine (its
# champion-phase runs then took 1.00x their estimates) the margin is smaller, and what that frees widens the rung.
CHAMPION_MARGIN = 0.1
MEASURED_MARGIN = 0.03


@dataclass(frozen=True)
class Rate:
    """Seconds a trial of a model of `flops` per image takes per training image and per validation image."""

    flops: int
    train_seconds_per_image: float
    eval_seconds_per_image: float


@dataclass(frozen=True)
class Rates:
    """Measured rates of the space's smallest, typical and largest models, on one thread count, plus what a trial
    costs beyond its images (building, the first batches, recording)."""

    threads: int
    points: tuple[Rate, ...]  # by flops, ascending
    trial_seconds: float = 2.0

    def at(self, flops: int | None) -> Rate:
        """The rate of a model of `flops` per image: linear between the measured points, flat beyond them."""
        points = sorted(self.points, key=lambda r: r.flops)
        if flops is None:
            return points[len(points) // 2]
        if flops <= points[0].flops:
            return points[0]
        for low, high in zip(points, points[1:], strict=False):
            if flops <= high.flops:
                share = (flops - low.flops) / max(high.flops - low.flops, 1)
                return Rate(flops, _between(low.train_seconds_per_image, high.train_seconds_per_image, share),
                            _between(low.eval_seconds_per_image, high.eval_seconds_per_image, share))
        return points[-1]

    def run_seconds(self, images: int, epochs: int, val_images: int, flops: int | None = None) -> float:
        """A complete run of `epochs` epochs on `images` training images, judged on `val_images` each epoch."""
        rate = self.at(flops)
        per_epoch = images * rate.train_seconds_per_image + val_images * rate.eval_seconds_per_image
        return self.trial_seconds + epochs * per_epoch

    @property
    def promoted_flops(self) -> int:
        """The size the plan assumes of its configurations: the largest measured. The sampler soon favours the
        better configurations, and those tend to be the bigger ones. Measured in two 30-minute cnn runs: the median
        rung-0 trial, every promoted one and the champion were the space's largest model; the plan's estimates at
        half way from the typical model were 1.4x short. A plan made for smaller models would promise configurations
        and champion runs that the clock then has to cut."""
        return max(r.flops for r in self.points)

    def scaled(self, factor: float) -> Rates:
        """These rates on a device `factor` times as fast."""
        points = tuple(Rate(r.flops, r.train_seconds_per_image / factor, r.eval_seconds_per_image / factor)
                       for r in self.points)
        return Rates(self.threads, points, self.trial_seconds / factor)

    def as_dict(self) -> dict[str, Any]:
        return {"threads": self.threads, "trial_seconds": self.trial_seconds,
                "points": [asdict(r) for r in self.points]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Rates:
        return cls(data["threads"], tuple(Rate(**r) for r in data["points"]), data["trial_seconds"])


def _between(low: float, high: float, share: float) -> float:
    return low + (high - low) * share


@dataclass(frozen=True)
class Stage:
    """One stage of the plan: a rung, or the champion phase (full fidelity, `seeds` runs of each configuration)."""

    name: str  # "rung 0", "rung 1", "champion"
    images: int  # training images of each run
    epochs: int
    configs: int
    seeds: int  # runs of each configuration (1 for a rung)
    seconds_each: float  # a typical configuration's run
    parallel: int  # runs at once (the workers at rung 0; 1 later, on all the threads)

    @property
    def runs(self) -> int:
        return self.configs * self.seeds

    @property
    def seconds(self) -> float:
        return math.ceil(self.runs / self.parallel) * self.seconds_each

    @property
    def rung(self) -> int | None:
        """The rung's index (None: the champion phase)."""
        return int(self.name.split()[1]) if self.name.startswith("rung ") else None


@dataclass(frozen=True)
class Plan:
    minutes: float
    workers: int  # at rung 0
    threads: int  # all of them: the later stages' threads
    stages: tuple[Stage, ...]
    reserve_seconds: float
    warnings: tuple[str, ...] = field(default_factory=tuple)
    each: Rates | None = None  # the rates it was made with: a trial's at rung 0...
    whole: Rates | None = None  # ...and on all the threads

    @property
    def planned_seconds(self) -> float:
        return self.reserve_seconds + sum(s.seconds for s in self.stages)

    @property
    def rungs(self) -> list[Stage]:
        return [s for s in self.stages if s.rung is not None]

    @property
    def champion(self) -> Stage:
        return next(s for s in self.stages if s.rung is None)

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def after(self, name: str) -> float:
        """Planned seconds of the stages after stage `name` (what must be left for them when it ends)."""
        names = [s.name for s in self.stages]
        return sum(s.seconds for s in self.stages[names.index(name) + 1:])

    def as_dict(self) -> dict[str, Any]:
        rates = {k: r.as_dict() for k, r in (("each", self.each), ("whole", self.whole)) if r is not None}
        return {"minutes": self.minutes, "workers": self.workers, "threads": self.threads,
                "reserve_seconds": self.reserve_seconds, "warnings": list(self.warnings),
                "stages": [asdict(s) for s in self.stages], **rates}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        each, whole = (Rates.from_dict(data[k]) if k in data else None for k in ("each", "whole"))
        return cls(data["minutes"], data["workers"], data["threads"], tuple(Stage(**s) for s in data["stages"]),
                   data["reserve_seconds"], tuple(data.get("warnings", ())), each, whole)


@dataclass(frozen=True)
class Budget:
    """What a plan is made for: the minutes, the data's size, the workers, the champion phase wanted."""

    minutes: float
    train_images: int
    val_images: int
    classes: int
    epochs: int  # full fidelity
    workers: int
    top_k: int
    seeds: int
    cap: int | None = None  # the study's `trials`: at most this many configurations at rung 0
    queued: int = 0  # the study's baselines: rung-0 configurations beyond the sampled ones


def rung_images(share: float, train_images: int, classes: int) -> int:
    """A rung's training images: its share of the split, unless that leaves too few of each class."""
    images = math.floor(train_images * share)
    return train_images if images < MIN_SUBSET_PER_CLASS * classes else images


def make_plan(budget: Budget, each: Rates, whole: Rates) -> Plan:
    """The plan of `budget`'s minutes with trials at rates `each` on every worker at rung 0, `whole` on all the threads
    later. When the champion phase takes more than CHAMPION_SHARE of the minutes, or leaves rung 0 room for fewer than
    BROAD_FIRST_RUNG sampled configurations (the later rungs at their least), its seeds, then its configurations are
    cut (down to 2 seeds of 1, or 1 seed where 2 would leave rung 0 under MIN_FIRST_RUNG; a warning says so). The
    phase is planned again at its start, with the time left and the size of the configuration it trains."""
    full = whole.run_seconds(budget.train_images, budget.epochs, budget.val_images, whole.promoted_flops)
    reserve = RESERVE_SECONDS + RESERVE_SHARE * budget.minutes * 60
    warnings: list[str] = []
    seeds, usable = budget.seeds, budget.minutes * 60 - reserve
    # A fast device confirms more configurations at full fidelity (the study's top_k is the least it asks for),
    # unless the study caps its configurations.
    affordable = math.floor(CHAMPION_SHARE * usable / (seeds * full)) if budget.cap is None else 0
    top_k = max(budget.top_k, min(MAX_CHAMPIONS, affordable))
    while True:
        champion = Stage("champion", budget.train_images, budget.epochs, top_k, seeds, full, 1)
        rungs = _rungs(budget, each, whole, budget.minutes * 60 - reserve - champion.seconds, top_k)
        capped = budget.cap is not None and rungs[0].configs >= budget.cap
        searches = champion.seconds <= CHAMPION_SHARE * usable and rungs[0].configs >= broad(budget)
        if searches or capped or (top_k, seeds) == (1, 1):
            break
        if (top_k, seeds) == (1, min(2, budget.seeds)) and rungs[0].configs >= MIN_FIRST_RUNG:
            break  # two seeds before more breadth; one only where two would leave no search at all
        if seeds > 2:
            seeds -= 1
        elif top_k > 1:
            top_k -= 1
        else:
            seeds -= 1
    if top_k < budget.top_k or seeds < budget.seeds:
        warnings.append(f"the champion phase is cut to {top_k} configuration(s) x {seeds} seeds (the study asks "
                        f"{budget.top_k} x {budget.seeds}) so that the search samples enough configurations")
    if rungs[0].configs < MIN_FIRST_RUNG and not (budget.cap is not None and rungs[0].configs >= budget.cap):
        warnings.append(f"{_duration(budget.minutes * 60)} leave room for only {rungs[0].configs} configurations at "
                        "rung 0 on this machine: raise minutes for a real search")
    return Plan(budget.minutes, budget.workers, whole.threads, (*rungs, champion), reserve, tuple(warnings), each,
                whole)


@dataclass(frozen=True)
class Now:
    """What a stage about to start knows that the plan could only guess: the seconds left to the deadline, a run's
    seconds in each stage from it on (at the rates the runs so far corrected, for the configurations it will train),
    the configurations the stage before finished, and the runs of this stage already done (a resumed run)."""

    seconds: float
    costs: dict[str, float]  # stage name -> seconds a run of it takes
    below: int  # configurations finished by the stage before
    done: int = 0  # runs of this stage already complete
    measured: bool = False  # the costs come from runs on all the threads (a later rung's), not rung 0's or the plan's


def replan(made: Plan, stage: str, now: Now, asked: tuple[int, int], cap: int | None) -> Plan:
    """The plan from stage `stage` on, made again as it starts, with what the runs so far showed (`now`): a machine
    faster or slower than measured, and configurations larger or smaller than the plan assumed (the sampler's
    choice), would otherwise leave minutes unused or a champion phase without the time for its runs.

    Each rung trains the best 1/KEEP of the one below. The champion phase gets the study's `asked` (configurations,
    seeds), more configurations in what the rungs leave (not when the study caps its configurations),
    and is cut where it does not: seeds down to 2, then the rung's configurations down to the best ninth of the rung
    below, then the champion's configurations, then the rung's down to them, then (at its own start) seeds to 1."""
    names = [s.name for s in made.stages]
    start = names.index(stage)
    rungs, champion = list(made.stages[start:-1]), made.champion
    counts, below = [], now.below
    for _ in rungs:
        below = max(math.ceil(below / KEEP), 1)
        counts.append(below)
    available = counts[-1] if counts else now.below  # configurations the champion phase can choose from
    full = now.costs["champion"]
    # At its own start the champion phase takes what is left; before, it keeps a margin.
    margin = 1 + (MEASURED_MARGIN if now.measured else CHAMPION_MARGIN) if rungs else 1.0

    def champion_seconds(top_k: int, seeds: int) -> float:
        return max(top_k * seeds - (now.done if not rungs else 0), 0) * full * margin

    def rung_seconds(counts: list[int]) -> float:
        return sum(max(n - (now.done if i == 0 else 0), 0) * now.costs[r.name]
                   for i, (r, n) in enumerate(zip(rungs, counts, strict=True)))

    top_k, seeds = asked
    if cap is None:  # more configurations in what the rungs leave: rung 0, whose breadth the first plan kept, is done
        spare = now.seconds - rung_seconds(counts)
        top_k = max(top_k, min(MAX_CHAMPIONS, math.floor(spare / (seeds * full * margin))))
    top_k = max(1, min(top_k, available))
    # A rung's tail (its configurations past the best ninth of the rung below) is worth less than a second
    # candidate at full fidelity: rung 1 ranks well, not perfectly.
    tail = max(math.ceil(now.below / KEEP ** 2), 1)
    third = counts[0] if counts else 0
    while rung_seconds(counts) + champion_seconds(top_k, seeds) > now.seconds:
        if seeds > 2:
            seeds -= 1
        elif counts and counts[0] > max(tail, top_k):
            counts[0] -= 1
        elif top_k > 1:
            top_k -= 1
        elif counts and counts[0] > top_k:
            counts[0] -= 1
        elif seeds > 1 and champion_seconds(top_k, seeds) > now.seconds * margin:
            seeds -= 1  # its runs alone (margin aside) outlast the time left: one run rather than no champion
        else:
            break
    # Fewer configurations may leave room for the seeds the study asks (1 x 3 where 2 x 2 did not fit).
    while seeds < asked[1] and rung_seconds(counts) + champion_seconds(top_k, seeds + 1) <= now.seconds:
        seeds += 1
    # What a cut freed (a seed fewer, where the runs did not fit) goes back to the rung, up to its third.
    while counts and counts[0] < third and rung_seconds([counts[0] + 1, *counts[1:]]) + champion_seconds(
            top_k, seeds) <= now.seconds:
        counts[0] += 1
    counts = [max(n, top_k) for n in counts]
    stages = [dataclasses.replace(r, configs=n, seconds_each=now.costs[r.name]) for r, n in zip(rungs, counts,
                                                                                                strict=True)]
    stages.append(dataclasses.replace(champion, configs=top_k, seeds=seeds, seconds_each=full))
    note = (f"planned again at {stage}, {now.seconds / 60:.1f} min left: " + ", ".join(
        f"{s.name} {s.configs} x {s.seeds} run(s) of {_duration(s.seconds_each)}" if s.rung is None else
        f"{s.name} {s.configs} configurations of {_duration(s.seconds_each)}" for s in stages))
    return dataclasses.replace(made, stages=(*made.stages[:start], *stages), warnings=(*made.warnings, note))


def _rungs(budget: Budget, each: Rates, whole: Rates, seconds: float, top_k: int) -> list[Stage]:
    """The cheap rungs, rung 0 as large as `seconds` allow (rung r holds 1/KEEP^r of it, at least `top_k`). Where
    that leaves rung 0 fewer than BROAD_FIRST_RUNG configurations, the later rungs shrink first (to LEAST_LATER
    configurations, or `top_k`) to make rung 0 that broad, then take back what is left."""
    shapes = _shapes(budget)
    costs = [(each if r == 0 else whole).run_seconds(images, epochs, budget.val_images, whole.promoted_flops)
             for r, (images, epochs) in enumerate(shapes)]

    def stages(counts: list[int]) -> list[Stage]:
        return [Stage(f"rung {r}", images, epochs, count, 1, cost, budget.workers if r == 0 else 1)
                for r, ((images, epochs), count, cost) in enumerate(zip(shapes, counts, costs, strict=True))]

    def fits(counts: list[int]) -> bool:
        return sum(s.seconds for s in stages(counts)) <= seconds

    def thirds(first: int) -> list[int]:
        return [first] + [min(max(math.ceil(first / KEEP ** r), top_k), first) for r in range(1, len(shapes))]

    def least(first: int) -> list[int]:
        return [first] + [min(max(LEAST_LATER, top_k), first)] * (len(shapes) - 1)

    cap = budget.cap if budget.cap is not None else 100_000
    first = _largest(thirds, fits, top_k, cap)
    if first >= broad(budget):
        return stages(thirds(first))
    first = max(first, min(_largest(least, fits, top_k, cap), broad(budget)))
    counts = least(first)
    for r in range(1, len(shapes)):  # the later rungs take back what rung 0 leaves, up to their third
        while counts[r] < thirds(first)[r] and fits([*counts[:r], counts[r] + 1, *counts[r + 1:]]):
            counts[r] += 1
    return stages(counts)


def broad(budget: Budget) -> int:
    """The configurations of a broad rung 0: BROAD_FIRST_RUNG sampled ones beside the study's baselines, or the cap."""
    wanted = BROAD_FIRST_RUNG + budget.queued
    return min(wanted, budget.cap) if budget.cap is not None else wanted


def _shapes(budget: Budget) -> list[tuple[int, int]]:
    """(training images, epochs) of each cheap rung: the LADDER's, without repeats or full fidelity itself."""
    shapes: list[tuple[int, int]] = []
    for share, rung_epochs in LADDER:
        images = rung_images(share, budget.train_images, budget.classes)
        epochs = min(rung_epochs, budget.epochs)  # a rung is never more than full fidelity
        if (images, epochs) not in shapes and (images, epochs) != (budget.train_images, budget.epochs):
            shapes.append((images, epochs))
    return shapes or [(budget.train_images, budget.epochs)]  # too small for cheaper: rung 0 is full fidelity


def _largest(counts: Callable[[int], list[int]], fits: Callable[[list[int]], bool], least: int, cap: int) -> int:
    """The most configurations at rung 0 (from `least` up to `cap`) whose rungs' `counts(first)` fit."""
    first = least
    while first < cap and fits(counts(first + 1)):
        first = max(first + 1, min(cap, int(first * 1.05)))  # grows fast on a fast device, then by ones
    while first > least and not fits(counts(first)):
        first -= 1
    return min(first, cap)


def table(plan: Plan, started: datetime | None = None) -> list[str]:
    """The plan as a few lines: one per stage, then the deadline as a clock time."""
    started = started or datetime.now()
    rows = [f"{'stage':<9} {'images x epochs':>16} {'configs':>8} {'runs':>5} {'each':>7} {'stage':>7}  at once"]
    for s in plan.stages:
        rows.append(f"{s.name:<9} {s.images:>9,} x {s.epochs:<4} {s.configs:>8} {s.runs:>5} "
                    f"{_duration(s.seconds_each):>7} {_duration(s.seconds):>7}  {s.parallel}")
    ends = started + timedelta(minutes=plan.minutes)
    rows.append(f"planned {_duration(plan.planned_seconds)} of {plan.minutes:g} min (reserve "
                f"{_duration(plan.reserve_seconds)}); the run ends by {ends:%H:%M}")
    return rows + [f"note: {w}" for w in plan.warnings]


def _duration(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 90:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min"
