"""The tracking server stays on this machine unless a login guards it, and no password leaks: not into output,
messages, MLflow records, nor the process list (/proc/<pid>/cmdline, which every user of the host can read), nor
the network (HTTPS with a certificate and key the test makes).

The unmarked tests need no server; the `scale` ones start `make server`'s command, PostgreSQL and workers.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from conftest import descendants_command_lines, mlflow_runs, wait_until, write_two_lr_study
from ui_process import free_port, wait_for_health

from pipeline import store
from pipeline.cli import main
from pipeline.commands import server
from pipeline.infra import urls
from pipeline.search import workers
from pipeline.search.options import SearchOptions
from pipeline.spec import studies
from pipeline.spec.errors import BadInput
from pipeline.tracking import connection

# A password that must never be seen; '@' makes its URL form (%40) differ from the password itself.
SENTINEL = "S3ntinel@Leak-Check"
SENTINEL_FORMS = ("S3ntinel", "Leak-Check")  # parts found in both its raw and its URL-encoded form
ADMIN_SENTINEL = "Adm1nSentinel-Pass-77"  # the basic-auth admin's password


def leaks(text: str) -> list[str]:
    """The sentinel parts in `text`, wherever a console may have wrapped it."""
    joined = "".join(text.split())
    return [form for form in (*SENTINEL_FORMS, ADMIN_SENTINEL) if form in joined]


def login_file(folder: Path) -> Path:
    """The README's basic-auth settings: users kept in a SQLite file, the admin's password in the file."""
    path = folder / "server-auth.ini"
    path.write_text(f"[mlflow]\ndefault_permission = EDIT\ndatabase_uri = sqlite:///{folder}/users.db\n"
                    f"admin_username = admin\nadmin_password = {ADMIN_SENTINEL}\nauth_cache_ttl_seconds = 300\n")
    return path


def self_signed(folder: Path, name: str = "server", passphrase: bytes | None = None) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost signed by its own key, and that key: PEM files in `folder`
    (the key encrypted with `passphrase`, if given)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256()))
    encryption = (serialization.BestAvailableEncryption(passphrase) if passphrase
                  else serialization.NoEncryption())
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption))
    return cert_path, key_path


def busy_port() -> socket.socket:
    """A listening socket: a server the tests start in this process stops at the port check, after the
    login gate and warnings have spoken."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    return listener


# --------------------------------------------------------------------------------------------------
# No server needed


def test_loopback_addresses_are_told_from_network_ones():
    assert all(urls.loopback(host) for host in ("127.0.0.1", "127.0.1.1", "::1", "localhost"))
    assert not any(urls.loopback(host) for host in ("0.0.0.0", "::", "10.1.2.3", "192.168.0.7", "mlflow.lab"))


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "mlflow.lab"])
def test_a_network_address_without_a_login_is_refused_in_one_line_naming_both_fixes(host, mlflow_store, capsys):
    with busy_port() as listener:
        code = main(["server", "--host", host, "--port", str(listener.getsockname()[1])])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    assert f"--host {host} would let anyone who reaches port" in err
    assert "AUTH=server-auth.ini" in err and "INSECURE=1" in err


def test_insecure_warns_of_the_risk_a_login_over_http_of_clear_text_and_a_login_over_https_not(mlflow_store,
                                                                                               tmp_path, capsys):
    with busy_port() as listener:
        port = listener.getsockname()[1]
        assert main(["server", "--host", "0.0.0.0", "--port", str(port), "--insecure"]) == 2  # got to the port
        insecure = capsys.readouterr()
        assert main(["server", "--host", "0.0.0.0", "--port", str(port), "--auth", str(login_file(tmp_path))]) == 2
        with_login = capsys.readouterr()
        cert, key = self_signed(tmp_path)
        said: list[str] = []
        with pytest.raises(BadInput, match=f"port {port} is already in use"):
            server.tracking_server("0.0.0.0", port, None, None, None, login_file(tmp_path), False, said.append,
                                   said.append, tls_cert=cert, tls_key=key)
    assert "warning: no login (INSECURE=1): anyone who reaches 0.0.0.0:" in insecure.err
    assert "can read, change and delete every run and registered model" in insecure.err
    assert f"port {port} is already in use" in insecure.err
    assert "warning: no TLS: the login's passwords cross the network" in with_login.err
    assert "TLS_CERT=" in with_login.err and f"port {port} is already in use" in with_login.err
    assert not [line for line in said if "warning" in line], said
    assert f"MLFLOW_TRACKING_URI=https://<this host>:{port}" in said[0]
    assert f"MLFLOW_TRACKING_SERVER_CERT_PATH=<a copy of {cert}>" in said[0]


@pytest.mark.parametrize(("host", "where"), [("::", "<this host>"), ("::1", "[::1]"), ("0.0.0.0", "<this host>"),
                                             ("127.0.0.1", "127.0.0.1")])
def test_the_start_line_gives_searches_a_url_they_can_use_ipv6_addresses_in_brackets(host, where, mlflow_store):
    said: list[str] = []
    with busy_port() as listener, pytest.raises(BadInput, match="is already in use"):
        port = listener.getsockname()[1]
        server.tracking_server(host, port, None, None, None, None, True, said.append, said.append)
    assert f"MLFLOW_TRACKING_URI=http://{where}:{port}  (Ctrl-C" in said[-1], said


def test_a_certificate_and_its_key_are_checked_before_the_server_starts(mlflow_store, tmp_path):
    """Each in one line naming the file: a certificate or key alone, a file that is not one, a missing file, the
    key of another certificate, and a key under a passphrase (uvicorn would ask for it on the terminal)."""
    cert, key = self_signed(tmp_path)
    other_cert, other_key = self_signed(tmp_path, "other")
    _, encrypted_key = self_signed(tmp_path, "encrypted", passphrase=b"a passphrase")

    def refusal(tls_cert: Path | None, tls_key: Path | None) -> str:
        with busy_port() as listener, pytest.raises(BadInput) as raised:
            server.tracking_server("127.0.0.1", listener.getsockname()[1], None, None, None, None, False, print,
                                   print, tls_cert=tls_cert, tls_key=tls_key)
        assert "\n" not in str(raised.value)
        return str(raised.value)

    assert "TLS_KEY (--tls-key) is missing" in refusal(cert, None)
    assert "TLS_CERT (--tls-cert) is missing" in refusal(None, key)
    assert f"TLS_CERT={key}: expected a PEM certificate" in refusal(key, key)
    assert f"TLS_CERT={tmp_path / 'absent.crt'}: No such file" in refusal(tmp_path / "absent.crt", key)
    assert f"TLS_KEY={cert}: expected a PEM private key" in refusal(cert, cert)
    assert f"TLS_KEY={other_key} is not the private key of TLS_CERT={cert}" in refusal(cert, other_key)
    assert f"TLS_KEY={encrypted_key}: the key is encrypted" in refusal(cert, encrypted_key)
    assert "is already in use" in refusal(other_cert, other_key)  # a good pair gets as far as the port
    with busy_port() as listener:  # the same through the command (make server TLS_CERT=...)
        assert main(["server", "--port", str(listener.getsockname()[1]), "--tls-cert", str(cert)]) == 2


def test_a_login_file_is_checked_before_the_server_starts(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    monkeypatch.delenv("MLFLOW_FLASK_SERVER_SECRET_KEY", raising=False)
    with pytest.raises(BadInput, match="no such file"):
        server.auth_environment(tmp_path / "absent.ini")
    no_password = tmp_path / "no-password.ini"
    no_password.write_text("[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///u.db\nadmin_username = a\n")
    with pytest.raises(BadInput, match=r"expected an \[mlflow\] section with admin_password"):
        server.auth_environment(no_password)
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", ADMIN_SENTINEL)  # the password may come from there instead
    first, second = server.auth_environment(no_password), server.auth_environment(no_password)
    assert first["MLFLOW_AUTH_CONFIG_PATH"] == str(no_password.resolve())
    assert len(first["MLFLOW_FLASK_SERVER_SECRET_KEY"]) >= 32  # a fresh random key when none is given
    assert first["MLFLOW_FLASK_SERVER_SECRET_KEY"] != second["MLFLOW_FLASK_SERVER_SECRET_KEY"]
    assert not leaks(str(first))


def test_store_and_tracking_errors_never_show_the_password(study_env, capsys):
    """A wrong host or port: the drivers' messages, and ours around them, name the store without its password."""
    wrong = f"postgresql://pipeline:{SENTINEL.replace('@', '%40')}@127.0.0.1:{free_port()}/optuna"
    for action in (lambda: store.make_storage(wrong),
                   lambda: connection.connect(f"http://admin:{ADMIN_SENTINEL}@127.0.0.1:{free_port()}")):
        with pytest.raises(BadInput) as raised:
            action()
        assert not leaks(str(raised.value)) and "***" in str(raised.value), raised.value
    study_env.write_study()
    assert study_env.replace(storage=wrong).run("search") == 2  # the same through the command line
    out, err = capsys.readouterr()
    assert "cannot be opened" in err and not leaks(out + err), err


def test_a_worker_gets_the_coordinators_storage_in_its_environment_not_its_command_line(study_env, monkeypatch):
    """Whatever STORAGE the user's environment holds, the worker opens the store the coordinator chose."""
    monkeypatch.setenv("STORAGE", "sqlite:///somewhere/else.db")
    chosen = f"postgresql://pipeline:{SENTINEL.replace('@', '%40')}@db-host/optuna"
    study_env.write_study()
    spec = studies.load("tiny", study_env.studies_dir)
    command = workers.worker_command(spec, SearchOptions(workers=2, worker_program=("python", "-m", "x")))
    assert "--storage" not in command
    # A stand-in worker with the real command's arguments: it reports the store a worker resolves (by its digest:
    # a worker's text lines are shown with passwords masked), and its argv.
    show = ("import hashlib, sys; from pipeline import store; "
            "print(hashlib.sha256(store.storage_url(None, 'tiny').encode()).hexdigest()); print(sys.argv)")
    pool = workers.Workers([sys.executable, "-c", show, *command[3:]], workers.plan(1, 1, []),
                           workers.storage_environment(chosen))
    lines = [item for _, item in pool.events(poll_seconds=30) if isinstance(item, str)]
    assert lines[0] == hashlib.sha256(chosen.encode()).hexdigest(), lines
    assert not leaks(lines[1]) and "--study" in lines[1]


# --------------------------------------------------------------------------------------------------
# A real server, PostgreSQL and workers


def listening_addresses(port: int) -> set[str]:
    """The local addresses with a socket listening on `port` (IPv4 and IPv6), from the kernel's tables."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                if len(address) == 8:
                    found.add(socket.inet_ntop(socket.AF_INET, bytes.fromhex(address)[::-1]))
                else:  # four little-endian 32-bit words
                    words = bytes.fromhex(address)
                    raw = b"".join(words[i:i + 4][::-1] for i in range(0, 16, 4))
                    found.add(socket.inet_ntop(socket.AF_INET6, raw))
    return found


def own_network_address() -> str | None:
    """An address of this host that is not loopback, if it has one (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def stop(process: subprocess.Popen) -> str:
    """SIGTERM, then what it printed."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    return process.communicate(timeout=60)[0] or ""


@pytest.mark.scale
def test_make_server_listens_on_loopback_only_by_default(mlflow_store):
    """`make server` with no HOST: `python -m pipeline server --port P`."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "server", "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_health(port)
        assert listening_addresses(port) == {"127.0.0.1"}
        elsewhere = own_network_address()
        if elsewhere is not None:
            with socket.socket() as s:
                assert s.connect_ex((elsewhere, port)) != 0  # refused from the network side
    finally:
        output = stop(process)
    assert f"MLflow tracking server on 127.0.0.1:{port}" in output


@pytest.mark.scale
def test_a_login_server_and_two_workers_on_postgresql_leak_no_password(study_env, postgresql_server, tmp_path,
                                                                      monkeypatch):
    """The README's many-hosts set-up on loopback: PostgreSQL with a sentinel password for both stores, `make
    server` with MLflow's login (another sentinel for its admin), a 2-worker search logging in through MLflow's
    variables. The sentinels are in no process's command line while it runs, no output, no MLflow record."""
    postgresql_server.create_user("sentinel", SENTINEL)
    optuna_url = postgresql_server.create_database("optuna_sentinel", "sentinel", SENTINEL)
    backend_url = postgresql_server.create_database("mlflow_sentinel", "sentinel", SENTINEL)
    port = free_port()
    quiet = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="1000")
    monkeypatch.delenv("STORAGE", raising=False)
    server_process = subprocess.Popen(  # `make server BACKEND=... AUTH=...`: the URL through the environment
        [sys.executable, "-m", "pipeline", "server", "--port", str(port), "--auth", str(login_file(tmp_path)),
         "--artifacts", str(tmp_path / "artifacts")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(quiet, MLFLOW_BACKEND_STORE_URI=backend_url))
    seen: dict[int, set[str]] = {}  # pid -> every command line it was seen with (before and after its exec)
    coordinator = None
    try:
        wait_for_health(port)
        uri = f"http://127.0.0.1:{port}"
        api = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"
        assert requests.get(api, timeout=30).status_code == 401  # no login: refused
        assert requests.get(api, auth=("admin", "wrong-password-123"), timeout=30).status_code == 401
        assert requests.get(api, auth=("admin", ADMIN_SENTINEL), timeout=30).status_code == 200
        with pytest.raises(BadInput, match="MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"):
            connection.connect(uri)  # a search without the login stops before training, saying what to set

        env = study_env.replace(storage=optuna_url, tracking_uri=uri)
        write_two_lr_study(env, trials=2, epochs=1)
        command = env.command("search", "--workers", "2")
        at = command.index("--storage")
        del command[at:at + 2]  # STORAGE comes from the environment, as `make search` with STORAGE exported
        coordinator = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=dict(quiet, STORAGE=optuna_url, MLFLOW_TRACKING_URI=uri, MLFLOW_TRACKING_USERNAME="admin",
                     MLFLOW_TRACKING_PASSWORD=ADMIN_SENTINEL))
        while coordinator.poll() is None:  # every command line under the server and the search, while they run
            for pid, line in descendants_command_lines([server_process.pid, coordinator.pid]).items():
                seen.setdefault(pid, set()).add(line)
            time.sleep(0.05)  # a worker of this tiny study lives a few seconds: look often
        search_output = coordinator.communicate(timeout=60)[0]
        assert coordinator.returncode == 0, search_output

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_SENTINEL)
        recorded = mlflow_runs(uri)
    finally:
        if coordinator is not None and coordinator.poll() is None:
            coordinator.kill()
        server_output = stop(server_process)

    lines = [line for versions in seen.values() for line in versions]
    worker_pids = [int(pid) for pid in re.findall(r"worker \d: pid (\d+)", search_output)]
    looked_at = [pid for pid in worker_pids if any(" --worker " in f" {line} " for line in seen.get(pid, ()))]
    assert len(worker_pids) == 2 and looked_at == worker_pids, "\n".join([*lines, search_output])  # seen running
    assert any("uvicorn" in line for line in lines) and any("mlflow server" in line for line in lines)
    assert [line for line in lines if leaks(line)] == []
    assert not leaks(search_output) and not leaks(server_output)
    assert "postgresql://sentinel:***@127.0.0.1" in search_output  # the workers' storage, shown masked

    finished = [t for t in env.records() if t.finished]
    children = [r for r in recorded if "mlflow.parentRunId" in r.data.tags]
    assert len(finished) == 2 and len(children) == 2  # the authenticated search logged its runs
    for run in recorded:  # parent and children: no param or tag holds a password
        assert not leaks(repr(run.data.params) + repr(run.data.tags)), run.info.run_id


TRAINER_PASSWORD = "Tra1ner-Sentinel-Pass-31"  # the non-admin account the searches log in with


@pytest.mark.scale
def test_a_search_logs_its_runs_over_https_as_a_non_admin_and_plain_http_is_refused(study_env, mlflow_store,
                                                                                      tmp_path):
    """The README's many-hosts recipe on loopback with SQLite: `make server AUTH=... TLS_CERT=... TLS_KEY=...` with a
    self-signed certificate, an account for the searches made by the admin over HTTPS, a search that trusts the
    certificate through MLFLOW_TRACKING_SERVER_CERT_PATH and logs in as that account."""
    cert, key = self_signed(tmp_path)
    port = free_port()
    quiet = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="1000")
    server_process = subprocess.Popen(  # `make server AUTH=... ARTIFACTS=... TLS_CERT=... TLS_KEY=...`
        [sys.executable, "-m", "pipeline", "server", "--port", str(port), "--auth", str(login_file(tmp_path)),
         "--artifacts", str(tmp_path / "artifacts"), "--tls-cert", str(cert), "--tls-key", str(key)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=quiet)
    uri = f"https://127.0.0.1:{port}"
    try:
        def healthy() -> bool:
            assert server_process.poll() is None, f"the server exited with {server_process.returncode}"
            return requests.get(f"{uri}/health", verify=str(cert), timeout=5).ok

        wait_until(healthy, "the server to answer over HTTPS", timeout=90,
                   ignore=(requests.ConnectionError, requests.Timeout))
        with pytest.raises(requests.ConnectionError):  # plain HTTP on that port: the TLS handshake fails
            requests.get(f"http://127.0.0.1:{port}/health", timeout=30)
        with pytest.raises(requests.exceptions.SSLError):  # no system authority vouches for the certificate
            requests.get(f"{uri}/health", timeout=30)
        trainer = {"username": "trainer", "password": TRAINER_PASSWORD}
        created = requests.post(f"{uri}/api/2.0/mlflow/users/create", json=trainer, auth=("admin", ADMIN_SENTINEL),
                                verify=str(cert), timeout=30)
        assert created.ok, created.text

        env = study_env.replace(tracking_uri=uri)
        write_two_lr_study(env, trials=2, epochs=1)
        login = dict(quiet, MLFLOW_TRACKING_URI=uri, MLFLOW_TRACKING_USERNAME="trainer",
                     MLFLOW_TRACKING_PASSWORD=TRAINER_PASSWORD)
        untrusted = subprocess.run(env.command("search"), capture_output=True, text=True, env=login, timeout=300)
        assert untrusted.returncode == 2 and "SSLError" in untrusted.stderr, untrusted.stderr  # before training
        search = subprocess.run(env.command("search"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=dict(login, MLFLOW_TRACKING_SERVER_CERT_PATH=str(cert)), timeout=600)
        assert search.returncode == 0, search.stdout
        runs = mlflow_runs(mlflow_store)  # the server's backend store, read directly
        granted = requests.get(f"{uri}/api/3.0/mlflow/users/current/permissions", auth=("trainer", TRAINER_PASSWORD),
                               verify=str(cert), timeout=30).json()
    finally:
        server_output = stop(server_process)
    assert f"MLFLOW_TRACKING_URI=https://127.0.0.1:{port}" in server_output, server_output
    finished = [t for t in env.records() if t.finished]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(finished) == 2 and len(children) == 2, server_output  # the search over HTTPS logged its runs
    # The trainer account made the study's experiment and registered model (MLflow grants their maker MANAGE).
    made = {(p["resource_type"], p["resource_pattern"], p["permission"]) for p in granted["permissions"]}
    assert not granted["is_admin"], granted
    assert {("experiment", runs[0].info.experiment_id, "MANAGE"), ("registered_model", "tiny", "MANAGE")} <= made, made
    assert not leaks(search.stdout + server_output) and TRAINER_PASSWORD not in search.stdout + server_output
