"""The MLflow server: `make ui` (the UI on 127.0.0.1, opened on a study's runs) and `make server` (a tracking
server searches on other hosts log to). Both run `mlflow server` as a child that stops with us."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from mlflow.server.security_utils import get_default_allowed_hosts

from pipeline import store, tracking
from pipeline.concurrency import stop_with_parent
from pipeline.errors import BadInput
from pipeline.studies import StudySpec


def ui(spec: StudySpec | None, storage_override: str | None, port: int, say: Callable[[str], None]) -> int:
    """The MLflow UI of the tracking store, on the study's runs table (or the experiments list)."""
    uri = tracking.tracking_uri()
    client = tracking.connect(uri)
    page = "#/experiments"
    if spec is not None:
        name = store.find_study(spec, store.open_storage(storage_override, spec.name).backend).study_name
        experiment_id = tracking.experiment_id(client, name)
        if experiment_id is None:
            raise BadInput(f"study {name!r} has no MLflow experiment in {uri} yet; run `make search "
                           f"STUDY={spec.name}` with tracking on (the default) first")
        page = f"#/experiments/{experiment_id}/runs"
    if tracking.artifact_root(uri) is None:  # an `mlflow server` already serves its own UI
        say(f"MLflow UI: {uri.rstrip('/')}/{page}")
        return 0
    say(f"MLflow UI on {uri}: open http://127.0.0.1:{port}/{page}  (Ctrl-C stops it)")
    return serve(uri, "127.0.0.1", port, tracking.artifact_root(uri), "make ui")


def tracking_server(host: str, port: int, backend: str | None, artifacts: Path | None, allowed: str | None,
                    say: Callable[[str], None]) -> int:
    """An MLflow tracking server on `host:port` over the database `backend` (default: the tracking store)."""
    backend = backend or tracking.tracking_uri()
    if tracking.artifact_root(backend) is None:
        raise BadInput(f"--backend {backend}: expected a database URI (sqlite:///..., postgresql://...), "
                       "not another server")
    tracking.connect(backend)  # creates the schema now, and fails here with one line if it cannot
    artifacts = artifacts or tracking.artifact_root(backend)
    shown = "<this host>" if host == "0.0.0.0" else host
    say(f"MLflow tracking server on {host}:{port} (backend {backend}, artifacts {artifacts}); "
        f"point searches at it with MLFLOW_TRACKING_URI=http://{shown}:{port}  (Ctrl-C stops it)")
    return serve(backend, host, port, artifacts, "make server", allowed_hosts(allowed))


def allowed_hosts(extra: str | None) -> str:
    """The Host headers the server answers: MLflow's defaults (localhost, private IP addresses), this
    host's own names, and `extra`. MLflow 3 refuses any other name (DNS rebinding protection), and
    training hosts usually reach the server by its host name."""
    names = sorted({socket.gethostname(), socket.getfqdn()})
    listed = [h.strip() for h in (extra or "").split(",") if h.strip()]
    return ",".join([*get_default_allowed_hosts(), *names, *(f"{name}:*" for name in names), *listed])


def serve(backend: str, host: str, port: int, artifacts: Path, target: str, allowed: str | None = None) -> int:
    """Run `mlflow server` until Ctrl-C, SIGTERM or a closed terminal; artifacts are proxied by the server."""
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            raise BadInput(f"port {port} is already in use; pick another with PORT=5001 ({target}) or --port")
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend, "--host", host,
               "--port", str(port), "--workers", "1", "--artifacts-destination", str(artifacts)]
    if allowed:
        command += ["--allowed-hosts", allowed]
    # Its own process group: `mlflow server` runs uvicorn as a child, and both must stop with us (Ctrl-C,
    # SIGTERM, a closed terminal); if we are killed outright, the kernel tells the server (Linux).
    server = subprocess.Popen(command, start_new_session=True, preexec_fn=stop_with_parent)
    for stop in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(stop, _raise_keyboard_interrupt)
    try:
        return server.wait()
    except KeyboardInterrupt:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        return 0


def _raise_keyboard_interrupt(signal_number: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal_number)
