"""The plan of a study's minutes (search/plan.py): pure arithmetic on rates, so these feed it faked ones."""

from __future__ import annotations

import dataclasses
import math

import pytest

from pipeline.search import plan
from pipeline.search.plan import Budget, Rate, Rates, make_plan

# About a 2-core CPU's rates for the cnn space at 1 thread (bf16): 0.3-0.9 ms per training image.
CPU = Rates(1, (Rate(5_000_000, 0.0003, 0.0001), Rate(20_000_000, 0.0005, 0.00015), Rate(60_000_000, 0.0009, 0.0003)),
            trial_seconds=1.3)
MNIST = Budget(minutes=30, train_images=55_000, val_images=5_000, classes=10, epochs=5, workers=2, top_k=2, seeds=3)


def test_rates_interpolate_by_flops_and_hold_flat_beyond_the_measured_models():
    assert CPU.at(5_000_000).train_seconds_per_image == 0.0003
    assert CPU.at(12_500_000).train_seconds_per_image == pytest.approx(0.0004)
    assert CPU.at(1_000).train_seconds_per_image == 0.0003
    assert CPU.at(10**12).train_seconds_per_image == 0.0009
    assert CPU.at(None) == CPU.points[1]  # unknown size: the typical model
    seconds = CPU.run_seconds(1000, 2, 500)
    assert seconds == pytest.approx(1.3 + 2 * (1000 * 0.0005 + 500 * 0.00015))


def test_a_plan_fills_the_minutes_and_no_more():
    made = make_plan(MNIST, CPU, CPU.scaled(1.8))
    assert made.planned_seconds <= 30 * 60
    assert made.planned_seconds > 0.9 * 30 * 60  # it uses them
    assert [s.name for s in made.stages] == ["rung 0", "rung 1", "champion"]
    first, second, champion = made.stages
    assert (first.images, first.epochs) == (55_000 // 8, 1) and (second.images, second.epochs) == (55_000 // 4, 2)
    assert second.configs == math.ceil(first.configs / plan.KEEP)
    assert (champion.images, champion.epochs) == (55_000, 5)
    assert first.parallel == 2 and second.parallel == champion.parallel == 1
    # The study's 2 x 3 full-fidelity runs (14 min) would take more than the champion's share: a seed less.
    assert (champion.configs, champion.seeds) == (2, 2)
    assert champion.seconds <= plan.CHAMPION_SHARE * (30 * 60 - made.reserve_seconds)
    assert made.warnings == ("the champion phase is cut to 2 configuration(s) x 2 seeds (the study asks 2 x 3) so "
                             "that the search samples enough configurations",)


@pytest.mark.parametrize("faster", [3.0, 10.0])
def test_a_faster_device_gets_about_as_many_times_the_configurations(faster):
    base = make_plan(MNIST, CPU, CPU.scaled(1.8))
    fast = make_plan(MNIST, CPU.scaled(faster), CPU.scaled(1.8 * faster))
    ratio = fast.rungs[0].configs / base.rungs[0].configs
    # at least that many times; more, since the champion phase's full-fidelity runs then take a smaller share
    assert 0.8 * faster <= ratio <= 3 * faster, (base.rungs[0].configs, fast.rungs[0].configs)
    assert fast.planned_seconds <= 30 * 60
    assert fast.champion.configs > base.champion.configs  # and confirms more configurations at full fidelity


def test_a_slow_device_still_plans_within_its_minutes_by_cutting_the_champion_phase():
    slow = make_plan(MNIST, CPU.scaled(0.4), CPU.scaled(0.4 * 1.8))
    assert slow.planned_seconds <= 30 * 60
    champion = slow.champion
    assert champion.seeds * champion.configs < 2 * 3  # cut to leave the search room
    assert any("champion phase is cut" in w for w in slow.warnings)
    assert slow.rungs[0].configs >= plan.MIN_FIRST_RUNG


@pytest.mark.parametrize("baselines", [0, 2])
def test_a_slow_device_keeps_rung_zero_broad_by_shrinking_the_later_rungs_first(baselines):
    """A device where a full-fidelity run takes over 6 minutes (fp32 on a 2-core CPU), 28 of 30 minutes left after a
    fresh clone's set-up: the best third of rung 0 at rung 1 would leave rung 0 under 30 configurations. Rung 1
    shrinks instead (still a comparison), and takes back what rung 0's 40 sampled configurations leave."""
    budget = Budget(**{**MNIST.__dict__, "minutes": 28, "queued": baselines})
    slow = make_plan(budget, CPU.scaled(0.37), CPU.scaled(0.37 * 1.8))
    first, second, champion = slow.stages
    assert first.configs == plan.BROAD_FIRST_RUNG + baselines  # the study's baselines come on top of the 40
    assert plan.LEAST_LATER <= second.configs < math.ceil(first.configs / plan.KEEP)
    assert (champion.configs, champion.seeds) == (1, 2)
    assert slow.planned_seconds <= 28 * 60 < slow.planned_seconds + second.seconds_each  # rung 1 took what was left
    # On a device fast enough for both, rung 1 keeps its third and rung 0 goes past 40.
    fast = make_plan(budget, CPU, CPU.scaled(1.8))
    assert fast.rungs[1].configs == math.ceil(fast.rungs[0].configs / plan.KEEP) and fast.rungs[0].configs > 40


def test_a_champion_phase_that_would_leave_no_search_at_all_is_planned_over_one_seed():
    """20 epochs at full fidelity (a run of 17 minutes, fashion-cnn on a slow day): two seeds would not even fit.
    One seed is planned, rung 0 gets its breadth, and the phase planned again at its start (with the time left and
    the size of the configuration it trains) takes the second seed if the time left holds it."""
    budget = Budget(**{**MNIST.__dict__, "minutes": 28, "epochs": 20, "top_k": 1, "seeds": 2})
    slow = make_plan(budget, CPU.scaled(0.55), CPU.scaled(0.55 * 1.8))
    assert 2 * slow.champion.seconds_each > 28 * 60
    assert (slow.champion.configs, slow.champion.seeds) == (1, 1)
    assert slow.rungs[0].configs >= plan.BROAD_FIRST_RUNG and slow.planned_seconds <= 28 * 60
    assert any("cut to 1 configuration(s) x 1 seeds" in w for w in slow.warnings)


def test_a_device_too_slow_for_any_search_says_so():
    hopeless = make_plan(MNIST, CPU.scaled(0.01), CPU.scaled(0.01))
    assert any("raise minutes" in w for w in hopeless.warnings)


def test_the_study_cap_bounds_rung_zero_without_cutting_the_champion():
    capped = make_plan(Budget(**{**MNIST.__dict__, "cap": 5}), CPU, CPU)
    assert capped.rungs[0].configs == 5
    assert (capped.champion.configs, capped.champion.seeds) == (2, 3)
    assert not capped.warnings


def test_a_small_training_split_is_not_cut_below_a_class_minimum():
    small = make_plan(Budget(**{**MNIST.__dict__, "train_images": 3_000}), CPU, CPU)
    assert small.rungs[0].images == 3_000  # an eighth would hold under 50 images a class
    # its next rung would be the same shape as rung 0 or as full fidelity: not run twice
    assert len({(s.images, s.epochs) for s in small.stages}) == len(small.stages)


def test_a_plan_round_trips_through_its_stored_form():
    made = make_plan(MNIST, CPU, CPU.scaled(1.8))
    assert plan.Plan.from_dict(made.as_dict()) == made


def test_the_plan_table_shows_each_stage_and_the_deadline():
    from datetime import datetime

    rows = plan.table(make_plan(MNIST, CPU, CPU), datetime(2026, 1, 1, 10, 0))
    assert rows[0].split()[:2] == ["stage", "images"]
    assert [r.split()[0] for r in rows[1:4]] == ["rung", "rung", "champion"]
    assert rows[4].endswith("ends by 10:30")


def test_data_too_small_for_a_cheaper_rung_searches_at_full_fidelity():
    tiny = make_plan(Budget(**{**MNIST.__dict__, "train_images": 256, "epochs": 1}), CPU, CPU)
    (rung,) = tiny.rungs
    assert (rung.images, rung.epochs) == (256, 1) == (tiny.champion.images, tiny.champion.epochs)


def _made() -> plan.Plan:
    return make_plan(MNIST, CPU, CPU.scaled(1.8))


def test_a_rung_planned_again_trains_the_best_third_of_what_the_rung_below_finished():
    """Rung 0 planned for many configurations finished only 30 (a machine slower than measured, or larger models):
    rung 1 takes the best 10, and the champion keeps the study's 2 x 3 when the time left holds them."""
    made = _made()
    now = plan.Now(seconds=20 * 60, costs={"rung 1": 15.0, "champion": 120.0}, below=30)
    again = plan.replan(made, "rung 1", now, asked=(2, 3), cap=None)
    assert again.stages[0] == made.stages[0]  # what has run stays as it was planned
    assert again.stage("rung 1").configs == 10 and again.stage("rung 1").seconds_each == 15.0
    assert (again.champion.configs, again.champion.seeds, again.champion.seconds_each) == (2, 3, 120.0)
    assert again.after("rung 1") == 6 * 120.0  # rung 1 ends in time for them
    assert again.warnings[-1].startswith("planned again at rung 1, 20.0 min left: rung 1 10 configurations of 15 s, "
                                         "champion 2 x 3")


def test_a_plan_made_again_cuts_seeds_then_the_rungs_tail_then_configurations_to_fit_the_time_left():
    made = _made()
    costs = {"rung 1": 30.0, "champion": 100.0}

    def replanned(minutes: float, below: int = 30) -> tuple[int, int, int]:
        again = plan.replan(made, "rung 1", plan.Now(minutes * 60, costs, below), asked=(2, 3), cap=None)
        return again.stage("rung 1").configs, again.champion.configs, again.champion.seeds

    # The champion phase's runs count 10% over their estimate until it starts (plan.CHAMPION_MARGIN).
    assert replanned(16) == (10, 2, 3)  # 300 s + 660 s
    assert replanned(12.5) == (10, 2, 2)  # 300 s + 440 s: a seed less
    assert replanned(9.5) == (4, 2, 2)  # 120 s + 440 s: rung 1 down to the best ninth of rung 0 first
    assert replanned(6) == (4, 1, 2)  # 120 s + 220 s: then a configuration less
    assert replanned(4) == (1, 1, 2)  # 30 s + 220 s: rung 1 down to what fits (at least the champion's one)
    assert replanned(61, below=300) == (100, 2, 3)  # the best third, no more: the rest is the champion's
    # The champion's two runs alone outlast the time left (fashion-cnn's 20 epochs on a slow day): one seed, and what
    # that frees goes back to rung 1 (up to its third) rather than sit unused at the end.
    costs["champion"] = 400.0
    assert replanned(12) == (9, 1, 1)  # 270 s + 440 s
    assert replanned(10) == (5, 1, 1)  # 150 s + 440 s


def test_the_champion_phase_planned_at_its_start_fits_its_runs_to_the_time_left_or_takes_more():
    made = _made()

    def at_champion(seconds: float, below: int = 5, done: int = 0, cap: int | None = None) -> tuple[int, int]:
        again = plan.replan(made, "champion", plan.Now(seconds, {"champion": 100.0}, below, done), (2, 3), cap)
        return again.champion.configs, again.champion.seeds

    assert at_champion(650) == (2, 3)
    assert at_champion(450) == (2, 2)  # 4 runs fit
    assert at_champion(350) == (1, 3)  # one configuration fewer leaves room for every seed the study asks
    assert at_champion(250) == (1, 2)
    assert at_champion(150) == (1, 1)  # one full-fidelity run rather than no champion
    assert at_champion(250, done=2) == (2, 2)  # a resumed phase needs only the runs it has not done
    assert at_champion(3_000) == (5, 3)  # a faster machine: every configuration of the last rung, at full fidelity
    assert at_champion(3_000, below=20) == (plan.MAX_CHAMPIONS, 3)
    assert at_champion(3_000, cap=20) == (2, 3)  # a study that caps its configurations keeps its top_k


def test_a_rung_planned_again_leaves_the_champion_phase_what_it_does_not_need():
    """Rung 0 is done; rung 1's best third needs 4 of the 25.5 minutes left: the champion phase takes a second
    configuration with the rest rather than leave it unused (the start's 40% share protected rung 0's breadth)."""
    now = plan.Now(seconds=25.5 * 60, costs={"rung 1": 8.2, "champion": 288.0}, below=87)
    again = plan.replan(_made(), "rung 1", now, asked=(1, 2), cap=None)
    assert (again.stage("rung 1").configs, again.champion.configs, again.champion.seeds) == (29, 2, 2)


def test_a_later_rung_planned_again_keeps_the_champion_phase_a_margin_that_its_own_start_spends():
    """Rung 1's 10 runs and the champion's 2 x 2 would fill the 700 s left exactly: an estimate a few percent short
    would then cost the champion a seed. Rung 1 gives up two runs to keep the phase 10% over its estimate (3% once
    runs on all the threads measured it); at its own start the phase takes the time left as it is."""
    now = plan.Now(seconds=700, costs={"rung 1": 30.0, "champion": 100.0}, below=30)
    again = plan.replan(_made(), "rung 1", now, asked=(2, 2), cap=None)
    assert (again.stage("rung 1").configs, again.champion.configs, again.champion.seeds) == (8, 2, 2)
    # Once rung 1's own runs have measured the machine, 3% is enough: a run more for rung 1.
    measured = plan.replan(_made(), "rung 1", dataclasses.replace(now, measured=True), asked=(2, 2), cap=None)
    assert measured.stage("rung 1").configs == 9
    at_start = plan.replan(again, "champion", plan.Now(400, {"champion": 100.0}, below=8), (2, 2), None)
    assert (at_start.champion.configs, at_start.champion.seeds) == (2, 2)
