"""Why something stopped: one vocabulary for a training run, the search loop, a whole search and the champion phase.

It lives here, in the lowest package, because the trainer needs it too and the trainer may import only data,
infra and spec. The four stop at different levels, but each level hands its reason up to the next one (a trial
records the trainer's, the loop's reason becomes the search's, the phase's is shown beside it), so one enum
names them all and each producer uses the members that are its own. A `StrEnum`: every member is its string,
so what was stored (a trial's `stop_reason` attribute, a worker's event line) and printed stays the same text,
and a stored string compares equal to its member.
"""

from __future__ import annotations

from enum import StrEnum


class StopReason(StrEnum):
    # A training run (train.fit): the trial's `stop_reason` attribute.
    COMPLETED = "completed"  # every epoch trained
    EARLY_STOPPING = "early_stopping"  # early_stopping_patience epochs without a val_accuracy gain
    CALLBACK = "callback"  # a callback asked to stop (a replay of a pruned trial)
    # The search: its loop, and the invocation as a whole.
    BUDGET = "budget"  # the study has its trials
    TIMEOUT = "timeout"  # the search's minutes are spent
    INTERRUPTED = "interrupted"  # Ctrl-C, SIGTERM or SIGHUP
    FAILED = "failed"  # the study stopped: too many failures in a row, a full disk
    # The champion phase.
    DONE = "done"  # every planned run is trained
    TIME = "time"  # the next run would exceed the phase's minutes: the rest waits for the next invocation
