"""Store URLs as they may be shown: a password never reaches the console, a log, an MLflow tag or a message.

Database URLs (postgresql://user:secret@host/db) and server URLs (http://user:secret@host:5000) may
carry a password. Everything the pipeline prints or records goes through `shown`, and any text that may
quote a URL (an exception's message, a traceback) through `masked_text`; the URL itself is handed to child
processes through their environment, never their command line (which every user of the host can read in
/proc/<pid>/cmdline).
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import unquote, urlsplit, urlunsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

HIDDEN = "***"

# scheme://user:password@ anywhere in a text. The password runs to the last "@" before a "/" or a blank, as
# urlsplit reads it, so a password with a bare "@" is masked whole; a user name cannot hold ":" or "@".
_CREDENTIALS = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s/:@]*):[^\s/]*@")


def shown(url: str | None) -> str:
    """`url` with any password replaced by ***; anything that is not a URL (a file path) as it is."""
    if not url or "://" not in url:
        return url or ""
    scheme = url.split("://", 1)[0]
    if scheme.split("+", 1)[0] in ("http", "https"):
        return _shown_http(url)
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return _shown_http(url)  # not a database URL SQLAlchemy knows: mask the userinfo part by hand


def _shown_http(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=f"{user}:{HIDDEN}@{host}{port}"))


def hide_in(text: str, *urls: str | None) -> str:
    """`text` (an exception's message, say) with every given URL's password masked wherever it appears."""
    for url in urls:
        if url and "://" in url:
            secret = _password(url)
            if secret:
                text = text.replace(url, shown(url))
                for form in {secret, unquote(secret)}:  # as written in the URL, and decoded
                    text = text.replace(form, HIDDEN)
    return text


def masked_text(text: str) -> str:
    """`text` (an exception's message, a traceback, a worker's output line) with the password of every URL in it
    replaced by ***: `scheme://user:secret@host` becomes `scheme://user:***@host`. Libraries quote the URL they
    were given in their errors (MLflow: "API request to http://user:secret@host/... failed"), whichever URL it is,
    so every stored or printed error text goes through here."""
    return _CREDENTIALS.sub(rf"\g<head>:{HIDDEN}@", text)


def _password(url: str) -> str | None:
    try:
        return urlsplit(url).password
    except ValueError:
        return None


def loopback(host: str) -> bool:
    """Does `host` (an address or name to listen on) keep the server to this machine?"""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: whatever it resolves to, assume the network
