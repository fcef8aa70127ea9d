"""Store URLs as they may be shown: a password never reaches the console, a log, an MLflow tag or a message.

Database URLs (postgresql://user:secret@host/db) and server URLs (http://user:secret@host:5000) may
carry a password. Everything the pipeline prints or records goes through `shown`, and any text that may
quote a URL (an exception's message, a traceback) through `text.masked_text`; the URL itself is handed to child
processes through their environment, never their command line (which every user of the host can read in
/proc/<pid>/cmdline).
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import unquote, urlsplit, urlunsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from pipeline.infra.text import HIDDEN, masked_text


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
    """`text` (an exception's message, say) with every URL's password masked (`masked_text`), and every given URL's
    password wherever it appears, even outside a URL."""
    text = masked_text(text)
    for url in urls:
        if url and "://" in url:
            secret = _password(url)
            if secret:
                text = text.replace(url, shown(url))
                for form in {secret, unquote(secret)}:  # as written in the URL, and decoded
                    text = text.replace(form, HIDDEN)
    return text


def error_line(exc: BaseException, *urls: str | None, limit: int = 300) -> str:
    """What a one-line error says of `exc`: the first line of its message that is not blank (its type's name when
    there is none), with every URL's password masked (`hide_in`: a driver may quote the URL it was given), then
    cut to `limit` characters."""
    first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return hide_in(first, *urls)[:limit]


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


def url_host(host: str) -> str:
    """`host` (an address or name listened on) as it goes in the URL a user opens: a wildcard address as
    <this host>, an IPv6 address in brackets."""
    if host in ("0.0.0.0", "::"):
        return "<this host>"
    return f"[{host}]" if ":" in host else host


def this_host_names() -> set[str]:
    """The names other machines reach this host by, as it knows them: its host name and fully qualified name."""
    return {socket.gethostname(), socket.getfqdn()}
