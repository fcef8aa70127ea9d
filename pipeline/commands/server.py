"""The MLflow server: `make ui` (the UI on 127.0.0.1, opened on a study's runs) and `make server` (a tracking
server searches on other hosts log to). Both run `mlflow server` as a child that stops with us.

Whoever reaches an `mlflow server` without a login can read, change and delete every run and registered
model, so it listens on 127.0.0.1 unless told otherwise, and another address needs MLflow's basic-auth
login (--auth, an .ini file) or an explicit --insecure. The backend URL and the login's settings reach the
server through its environment, never its command line (which every user of the host can read). Over plain HTTP
every request carries the login's password in clear text, so `make server` also serves HTTPS (TLS) with a
certificate and its key (--tls-cert, --tls-key), through uvicorn, the server `mlflow server` runs.
"""

from __future__ import annotations

import configparser
import importlib.util
import os
import secrets
import shlex
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from mlflow.server.security_utils import get_default_allowed_hosts

from pipeline import store
from pipeline.infra.concurrency import stop_signals_interrupt, stop_with_parent
from pipeline.infra.urls import loopback, shown, this_host_names, url_host
from pipeline.spec.errors import BadInput
from pipeline.spec.studies import StudySpec
from pipeline.tracking import connection

# `mlflow server` reads these (its --backend-store-uri option, the basic-auth app's settings and Flask key).
BACKEND_VARIABLE = "MLFLOW_BACKEND_STORE_URI"
AUTH_CONFIG_VARIABLE = "MLFLOW_AUTH_CONFIG_PATH"
AUTH_PASSWORD_VARIABLE = "MLFLOW_AUTH_ADMIN_PASSWORD"
SECRET_KEY_VARIABLE = "MLFLOW_FLASK_SERVER_SECRET_KEY"
AUTH_KEYS = ("database_uri", "admin_username", "default_permission")  # what MLflow's basic-auth app needs


def ui(spec: StudySpec | None, storage_override: str | None, port: int, say: Callable[[str], None]) -> int:
    """The MLflow UI of the tracking store, on the study's runs table (or the experiments list)."""
    uri = connection.tracking_uri()
    client = connection.connect(uri)
    page = "#/experiments"
    if spec is not None:
        name = store.find_study(spec, store.open_storage(storage_override, spec.name).backend).study_name
        experiment_id = connection.experiment_id(client, name)
        if experiment_id is None:
            raise BadInput(f"study {name!r} has no MLflow experiment in {shown(uri)} yet; run `make search "
                           f"STUDY={spec.name}` with tracking on (the default) first")
        page = f"#/experiments/{experiment_id}/runs"
    artifacts = connection.artifact_root(uri)
    if artifacts is None:  # an `mlflow server` already serves its own UI
        say(f"MLflow UI: {shown(uri).rstrip('/')}/{page}")
        return 0
    say(f"MLflow UI on {shown(uri)}: open http://127.0.0.1:{port}/{page}  (Ctrl-C stops it)")
    return serve(uri, "127.0.0.1", port, artifacts, "make ui")


def tracking_server(host: str, port: int, backend: str | None, artifacts: Path | None, allowed: str | None,
                    auth: Path | None, insecure: bool, say: Callable[[str], None],
                    warn: Callable[[str], None], tls_cert: Path | None = None, tls_key: Path | None = None) -> int:
    """An MLflow tracking server on `host:port` over the database `backend` (default: $MLFLOW_BACKEND_STORE_URI,
    else the tracking store). Any address but loopback needs the basic-auth login `auth` or `insecure`. With
    `tls_cert` and `tls_key` (PEM files) it serves HTTPS only."""
    if not loopback(host) and auth is None and not insecure:
        raise BadInput(f"--host {host} would let anyone who reaches port {port} read, change and delete runs and "
                       "models: add AUTH=server-auth.ini (--auth, MLflow's login; README \"Running on many machines\") "
                       "or INSECURE=1 (--insecure), or leave HOST unset to listen on 127.0.0.1 only")
    login = auth_environment(auth) if auth is not None else {}
    tls = check_tls(tls_cert, tls_key)
    backend = backend or os.environ.get(BACKEND_VARIABLE) or connection.tracking_uri()
    default_artifacts = connection.artifact_root(backend)
    if default_artifacts is None:
        raise BadInput(f"--backend {shown(backend)}: expected a database URI (sqlite:///..., postgresql://...), "
                       "not another server")
    connection.connect(backend)  # creates the schema now, and fails here with one line if it cannot
    artifacts = artifacts or default_artifacts
    if auth is None and not loopback(host):
        warn(f"warning: no login (INSECURE=1): anyone who reaches {host}:{port} can read, change and delete every "
             "run and registered model; use AUTH=server-auth.ini on a network you do not fully trust")
    elif tls is None and not loopback(host):
        warn(f"warning: no TLS: the login's passwords cross the network to {host}:{port} in clear text; add "
             "TLS_CERT=server.crt TLS_KEY=server.key (README \"Running on many machines\")")
    credentials = " with MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" if auth is not None else ""
    # A certificate of one's own (self-signed, or a private CA's) is trusted only where the client is told to.
    trust = (f" (and MLFLOW_TRACKING_SERVER_CERT_PATH=<a copy of {tls[0]}> unless a CA clients trust signed it)"
             if tls is not None else "")
    say(f"MLflow tracking server on {host}:{port} (backend {shown(backend)}, artifacts {artifacts}"
        f"{', login ' + str(auth) if auth is not None else ''}{', TLS ' + str(tls[0]) if tls is not None else ''}); "
        f"point searches at it with MLFLOW_TRACKING_URI={'https' if tls is not None else 'http'}://{url_host(host)}:{port}"
        f"{credentials}{trust}  (Ctrl-C stops it)")
    return serve(backend, host, port, artifacts, "make server", allowed_hosts(allowed), login, tls)


def check_tls(cert: Path | None, key: Path | None) -> tuple[Path, Path] | None:
    """The certificate and private key the server serves HTTPS with (absolute paths), once Python's ssl module has
    loaded them as the server will: PEM files, the key unencrypted and the certificate's own. None without them."""
    fix = "README \"Running on many machines\" shows how to make them"
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        missing = "TLS_CERT (--tls-cert)" if cert is None else "TLS_KEY (--tls-key)"
        raise BadInput(f"{missing} is missing: HTTPS needs both a certificate and its private key "
                       f"(TLS_CERT=server.crt TLS_KEY=server.key; {fix})")
    try:  # the certificate alone first, so that an error names the file at fault
        ssl.create_default_context(cafile=str(cert))
    except ssl.SSLError:
        raise BadInput(f"TLS_CERT={cert}: expected a PEM certificate (-----BEGIN CERTIFICATE-----); {fix}") from None
    except OSError as exc:
        raise BadInput(f"TLS_CERT={cert}: {exc.strerror}; expected a PEM certificate file; {fix}") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key, password=_no_passphrase)
    except _EncryptedKey:
        raise BadInput(f"TLS_KEY={key}: the key is encrypted and the server cannot ask for its passphrase; write an "
                       f"unencrypted copy only you can read: openssl pkey -in {key} -out server.key && chmod 600 "
                       "server.key") from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise BadInput(f"TLS_KEY={key} is not the private key of TLS_CERT={cert}: give the key the certificate "
                           "was made with") from None
        raise BadInput(f"TLS_KEY={key}: expected a PEM private key (-----BEGIN PRIVATE KEY-----); {fix}") from None
    except OSError as exc:
        raise BadInput(f"TLS_KEY={key}: {exc.strerror}; expected a PEM private key file; {fix}") from None
    return cert.resolve(), key.resolve()


class _EncryptedKey(Exception):
    pass


def _no_passphrase() -> str:
    """Called by ssl only for an encrypted key: uvicorn would ask for its passphrase on the terminal and wait."""
    raise _EncryptedKey


def auth_environment(config: Path) -> dict[str, str]:
    """The environment that turns on MLflow's basic-auth app with the settings in `config` (an .ini file with an
    [mlflow] section: database_uri, admin_username, default_permission, and admin_password unless
    $MLFLOW_AUTH_ADMIN_PASSWORD holds it). The Flask secret key is $MLFLOW_FLASK_SERVER_SECRET_KEY, or a fresh
    random one: the server runs one worker, so no other process has to share it."""
    fix = "see README \"Running on many machines\" for an example"
    parser = configparser.ConfigParser()
    try:
        if not parser.read(config):
            raise BadInput(f"AUTH={config}: no such file, or unreadable; write the login settings there ({fix})")
    except configparser.Error as exc:
        raise BadInput(f"AUTH={config}: not an .ini file ({type(exc).__name__}); {fix}") from None
    settings = parser["mlflow"] if parser.has_section("mlflow") else {}
    missing = [key for key in AUTH_KEYS if not settings.get(key)]
    if not settings.get("admin_password") and not os.environ.get(AUTH_PASSWORD_VARIABLE):
        missing.append(f"admin_password (or ${AUTH_PASSWORD_VARIABLE})")
    if missing:
        raise BadInput(f"AUTH={config}: expected an [mlflow] section with {', '.join(missing)}; {fix}")
    if importlib.util.find_spec("flask_wtf") is None:
        raise BadInput(f"AUTH={config}: MLflow's login needs Flask-WTF (the mlflow[auth] extra); run `make setup`")
    return {AUTH_CONFIG_VARIABLE: str(config.resolve()),
            SECRET_KEY_VARIABLE: os.environ.get(SECRET_KEY_VARIABLE) or secrets.token_hex(32)}


def allowed_hosts(extra: str | None) -> str:
    """The Host headers the server answers: MLflow's defaults (localhost, private IP addresses), this
    host's own names, and `extra`. MLflow 3 refuses any other name (DNS rebinding protection), and
    training hosts usually reach the server by its host name."""
    names = sorted(this_host_names())
    listed = [h.strip() for h in (extra or "").split(",") if h.strip()]
    return ",".join([*get_default_allowed_hosts(), *names, *(f"{name}:*" for name in names), *listed])


def serve(backend: str, host: str, port: int, artifacts: Path, target: str, allowed: str | None = None,
          login: dict[str, str] | None = None, tls: tuple[Path, Path] | None = None) -> int:
    """Run `mlflow server` until Ctrl-C, SIGTERM or a closed terminal; artifacts are proxied by the server.
    `login`: the environment of MLflow's basic-auth app (`auth_environment`); without it, no login. `tls`: the
    certificate and key (`check_tls`) of HTTPS, then the only protocol the port speaks."""
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            raise BadInput(f"port {port} is already in use; pick another with PORT=5001 ({target}) or --port")
    command = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port), "--workers", "1",
               "--artifacts-destination", str(artifacts)]
    if allowed:
        command += ["--allowed-hosts", allowed]
    if login:
        command += ["--app-name", "basic-auth"]
    if tls:
        command += ["--uvicorn-opts", shlex.join(["--ssl-certfile", str(tls[0]), "--ssl-keyfile", str(tls[1])])]
    # The backend URL may hold a password: the environment keeps it out of the process list (MLflow hands it on
    # to its uvicorn child the same way).
    environment = dict(os.environ, **(login or {}), **{BACKEND_VARIABLE: backend})
    # Its own process group: `mlflow server` runs uvicorn as a child, and both must stop with us (Ctrl-C,
    # SIGTERM, a closed terminal); if we are killed outright, the kernel tells the server (Linux).
    server = subprocess.Popen(command, env=environment, start_new_session=True, preexec_fn=stop_with_parent)
    stop_signals_interrupt()
    try:
        return server.wait()
    except KeyboardInterrupt:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        return 0
