"""Text from elsewhere as it may be shown or stored: class and file names, exception messages, a worker's output.

Plain string work (no import beyond the standard library), so the decoding processes that log file names load
nothing more for it.
"""

from __future__ import annotations

import re
import sys

HIDDEN = "***"

# scheme://user:password@ anywhere in a text. The password runs to the last "@" before a "/" or a blank, as
# urlsplit reads it, so a password with a bare "@" is masked whole; a user name cannot hold ":" or "@".
_CREDENTIALS = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s/:@]*):[^\s/]*@")
# Control characters but tab and newline: ESC starts the terminal's escape sequences (colours, titles, hyperlinks,
# moving the cursor), C1's CSI (0x9b) on some terminals too; rich and matplotlib pass them through.
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_LINE_BREAKS = re.compile(r"[\t\n]")


def masked_text(text: str) -> str:
    """`text` (an exception's message, a traceback, a worker's output line) with the password of every URL in it
    replaced by ***: `scheme://user:secret@host` becomes `scheme://user:***@host`. Libraries quote the URL they
    were given in their errors (MLflow: "API request to http://user:secret@host/... failed"), whichever URL it is,
    so every stored error text goes through here, and everything printed through `printable`."""
    return _CREDENTIALS.sub(rf"\g<head>:{HIDDEN}@", text)


def printable(text: str, one_line: bool = False) -> str:
    """`text` as a terminal or a figure may show it: no control character (a name may hold an ESC), no URL's
    password; `one_line` drops tabs and newlines too (a label, a name in a list)."""
    text = _CONTROL_CHARACTERS.sub("", masked_text(text))
    return _LINE_BREAKS.sub("", text) if one_line else text


def print_to_stderr(message: str) -> None:
    """Print a line on stderr at once (progress and repairs: a worker's stdout carries its events)."""
    print(message, file=sys.stderr, flush=True)


def byte_size(nbytes: int) -> str:
    """A size as a person reads it: 470.4 kB, 566.2 MB, 1.5 GB (decimal units)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"
