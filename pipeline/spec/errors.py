"""Error types the CLI maps to exit codes.

`BadInput` is anything the user can fix (a study file, a missing dataset, a bad parameter): the CLI
prints its one-line message and exits 2. Anything else is our bug and exits 1.
"""


class BadInput(Exception):
    """A problem the user can fix; the message names the thing, what was expected, and the fix."""


class DataError(BadInput):
    """A dataset file is missing, corrupt, or no source could provide it."""


class ParamError(BadInput):
    """A hyperparameter is unknown or out of range; raised before any training starts."""
