"""`make dashboard`: optuna-dashboard over a study's Optuna storage, opened on the study's page.

The dashboard has no login, and whoever reaches it can rename and delete studies, finish or fail trials and
edit their notes, so it listens on 127.0.0.1 unless told otherwise; another address needs an explicit
--insecure (as `make server` does). It runs in this process on the standard library's WSGI server, the one
optuna-dashboard's own `run_server` uses, opened here so that a taken port is one line of bad input and the
address is printed only once something listens on it. Its web pages ship inside the optuna-dashboard wheel:
nothing is fetched from the network.

Listening on 127.0.0.1 does not keep other sites out: a page of another site whose name its owner points at
127.0.0.1 (DNS rebinding) reaches the dashboard from the user's browser, and any page may send it a form. So it
answers only requests addressed to a name of its own, and changes only those its own pages send (`_guarded`).
"""

from __future__ import annotations

import errno
import ipaddress
import re
import socket
import threading
from collections.abc import Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import optuna_dashboard

from pipeline import store
from pipeline.infra.concurrency import stop_signals_interrupt
from pipeline.infra.urls import loopback, shown, this_host_names, url_host
from pipeline.spec.errors import BadInput
from pipeline.spec.studies import StudySpec


def dashboard(spec: StudySpec, storage_override: str | None, host: str, port: int, insecure: bool,
              say: Callable[[str], None], warn: Callable[[str], None]) -> int:
    """Serve optuna-dashboard over the storage that holds `spec`'s study on `host:port` until Ctrl-C, SIGTERM
    or a closed terminal (then 0). Any address but loopback needs `insecure`."""
    if not loopback(host) and not insecure:
        raise BadInput(f"--host {host} would let anyone who reaches port {port} rename and delete studies and "
                       "trials (optuna-dashboard has no login): add INSECURE=1 (--insecure), or leave HOST unset to "
                       "listen on 127.0.0.1 only")
    storage = store.open_storage(storage_override, spec.name)
    study = store.find_study(spec, storage.backend)
    study_id = storage.backend.get_study_id_from_name(study.study_name)
    server = _listen(host, port, _guarded(optuna_dashboard.wsgi(storage.backend), host, port))
    if not loopback(host):
        warn(f"warning: no login (INSECURE=1): anyone who reaches {host}:{port} can rename and delete studies "
             "and trials")
    say(f"Optuna dashboard of study {study.study_name!r} in {shown(storage.url)}: open "
        f"http://{url_host(host)}:{port}/dashboard/studies/{study_id}  (Ctrl-C stops it)")
    stop_signals_interrupt()
    # Requests are served on a thread of their own: a signal interrupts only this one, which waits. (On the main
    # thread it could land inside a request, where wsgiref's catch-all handler would swallow it.)
    serving = threading.Thread(target=server.serve_forever, name="optuna-dashboard", daemon=True)
    serving.start()
    try:
        serving.join()
        return 1  # serve_forever ends only on shutdown: it failed (the thread's traceback is on stderr)
    except KeyboardInterrupt:
        server.shutdown()  # lets the request in progress finish
        return 0
    finally:
        server.server_close()


def _listen(host: str, port: int, app: Callable) -> WSGIServer:
    server_class = _IPv6Server if ":" in host else WSGIServer
    try:
        return make_server(host, port, app, server_class, _QuietHandler)
    except OSError as exc:  # taken port, an address this host does not have, a name that does not resolve
        reason = "already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        raise BadInput(f"cannot listen on {host}:{port}: {reason}; pick another with PORT=8081 (make dashboard) "
                       "or --port, or another HOST") from None


# What a browser sends only from the page that asked for the change (fetch and forms set Origin on these).
STATE_CHANGING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_HOST_HEADER = re.compile(r"(?P<name>\[[0-9a-f:.]+\]|[a-z0-9.-]+)(?::(?P<port>[0-9]{1,5}))?")


def _guarded(app: Callable, host: str, port: int) -> Callable:
    """`app`, answering only requests whose Host is this dashboard's address (`_ours`), and refusing changes
    whose Origin is another page's than the dashboard's own: 403 with one line of text."""
    names = {"localhost", host.lower()}
    if host in ("0.0.0.0", "::"):  # other machines reach it by this host's names
        names |= {name.lower() for name in this_host_names()}

    def guarded(environ: dict, start_response: Callable) -> list[bytes]:
        address = environ.get("HTTP_HOST", "").lower()
        if not _ours(address, names, port):
            return _refuse(start_response, f"this is not the dashboard's address (DNS rebinding protection): open "
                           f"http://127.0.0.1:{port} or http://localhost:{port}")
        origin = environ.get("HTTP_ORIGIN")
        if (environ["REQUEST_METHOD"] in STATE_CHANGING_METHODS and origin is not None
                and origin.lower() != f"http://{address}"):
            return _refuse(start_response, "a change sent by another site's page (cross-origin request)")
        return app(environ, start_response)

    return guarded


def _ours(address: str, names: set[str], port: int) -> bool:
    """Is Host `address` this dashboard on `port`: localhost, the name it listens on (with a wildcard address,
    this host's names), or any IP address? An address is not a name a DNS answer can point elsewhere."""
    found = _HOST_HEADER.fullmatch(address)
    if found is None or int(found["port"] or 80) != port:
        return False
    name = found["name"]
    if name in names:
        return True
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True


def _refuse(start_response: Callable, reason: str) -> list[bytes]:
    body = f"Forbidden: {reason}\n".encode()
    start_response("403 Forbidden", [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))])
    return [body]


class _IPv6Server(WSGIServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    """No line per request on the terminal (the dashboard polls its API every few seconds); errors still show."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass
