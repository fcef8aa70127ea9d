"""A planned search's clock as a trial sees it: whether a run of its size can still end in its stage's time (else it
is not started), and whether the run's deadline has come (then it stops where it is). Times are wall-clock
(`time.time()`), so a coordinator and its workers keep the same one."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pipeline.search.plan import Rates
from pipeline.search.stopping import OutOfTime


@dataclass(frozen=True)
class TrialClock:
    rates: Rates  # of a trial on this process's threads
    val_images: int
    stage_end: float  # no run starts that would end after this
    deadline: float  # a run still training at this time is stopped (its checkpoint kept)
    now: Callable[[], float] = field(default=time.time)  # the wall clock (a test's own, to stop at a given moment)

    def estimate(self, images: int, epochs: int, flops: int | None) -> float:
        return self.rates.run_seconds(images, epochs, self.val_images, flops)

    def check_start(self, images: int, epochs: int, flops: int | None, what: str) -> None:
        """Raise OutOfTime (not started) when a run of this size would not end by the stage's end."""
        need, left = self.estimate(images, epochs, flops), self.stage_end - self.now()
        if need > left:
            raise OutOfTime(False, f"{what} needs about {need:.0f} s and {max(left, 0):.0f} s are left")

    def check_running(self, what: str) -> None:
        """Raise OutOfTime (started) once the deadline has come."""
        if self.now() >= self.deadline:
            raise OutOfTime(True, f"{what} was still training at the run's deadline")
