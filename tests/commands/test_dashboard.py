"""`make dashboard`: optuna-dashboard in a real process over the study's Optuna storage, on 127.0.0.1 only.

The unmarked tests check bad input (exit 2, one line) and the dashboard's API over SQLite and the journal file;
the `browser` one opens the printed address in headless Chromium (`make test-browser`). Screenshots land in
$SCREENSHOT_DIR (default: the test's temporary folder).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import requests
from conftest import TINY_CLI, StudyEnv, chromium, wait_until
from ui_process import free_port

from pipeline import store
from pipeline.cli import main
from pipeline.spec import paths


def dashboard_args(env: StudyEnv, *args: str) -> list[str]:
    return ["dashboard", "--study", "tiny", "--studies-dir", str(env.studies_dir), "--storage", env.storage, *args]


def dashboard_command(env: StudyEnv, *args: str) -> list[str]:
    """`python -m pipeline dashboard ...` as a process's argv (through tests/tiny_cli.py: the tiny dataset)."""
    return [sys.executable, str(TINY_CLI), str(env.root), *dashboard_args(env, *args)]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# --------------------------------------------------------------------------------------------------
# Bad input: exit 2 with one line, before anything listens


def test_an_unknown_study_exits_2_with_one_line():
    result = subprocess.run([sys.executable, "-m", "pipeline", "dashboard", "--study", "nosuchstudy"],
                            capture_output=True, text=True, timeout=120, cwd=paths.PROJECT_ROOT)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "no study 'nosuchstudy'" in result.stderr and "available studies" in result.stderr


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "dashboard.lab"])
def test_another_address_than_loopback_needs_insecure(study_env, capsys, host):
    study_env.write_study()
    assert main(dashboard_args(study_env, "--host", host)) == 2
    err = one_line_error(capsys)
    assert f"--host {host}" in err and "no login" in err and "INSECURE=1" in err


def test_a_study_never_run_exits_2_and_says_how_to_run_it(study_env, capsys):
    study_env.write_study()
    assert main(dashboard_args(study_env)) == 2
    err = one_line_error(capsys)
    assert "study 'tiny' has not been run yet" in err and "make search STUDY=tiny" in err


def test_a_taken_port_exits_2_with_one_line(study_env):
    study_env.write_study()
    optuna.create_study(study_name="tiny", storage=store.make_storage(study_env.storage))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(dashboard_command(study_env, "--port", str(port)), capture_output=True, text=True,
                                timeout=120)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"127.0.0.1:{port}: already in use" in result.stderr and "PORT=" in result.stderr


def test_make_dashboard_listens_on_loopback_port_8080_unless_told():
    def planned(*assignments: str) -> str:
        result = subprocess.run(["make", "--no-print-directory", "-s", "-n", "-C", str(paths.PROJECT_ROOT),
                                 "dashboard", "STUDY=cnn", *assignments], capture_output=True, text=True,
                                env={k: v for k, v in os.environ.items() if k not in ("PORT", "HOST", "INSECURE")},
                                timeout=60)
        assert result.returncode == 0, result.stderr
        return " ".join(result.stdout.replace("\\\n", " ").split())

    assert "pipeline dashboard --study cnn --port 8080 --host 127.0.0.1" in planned().replace('"', "")
    other = planned("PORT=9000", "HOST=0.0.0.0", "INSECURE=1")
    assert "--port 9000 --host 0.0.0.0 --insecure" in other


# --------------------------------------------------------------------------------------------------
# The dashboard in a real process


def start_dashboard(env: StudyEnv, port: int, log: Path) -> tuple[subprocess.Popen, str]:
    """`python -m pipeline dashboard` on env's storage in a process of its own; returns the process and the
    address it printed, once that address answers."""
    out, err = log.with_suffix(".out"), log.with_suffix(".err")
    with out.open("w") as stdout, err.open("w") as stderr:
        process = subprocess.Popen(dashboard_command(env, "--port", str(port)), stdout=stdout, stderr=stderr,
                                   env=dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="300"))

    def printed() -> str | None:
        assert process.poll() is None, f"the dashboard exited with {process.returncode}: {err.read_text()}"
        lines = out.read_text().splitlines()
        return lines[0] if lines else None

    try:
        line = wait_until(printed, "the dashboard's address", timeout=90, ignore=())
        url = next(word for word in line.split() if word.startswith("http://"))
        # Browsers always say which encodings they take; optuna-dashboard 0.21 fails /static without it.
        wait_until(lambda: requests.get(url, timeout=5, headers={"Accept-Encoding": "gzip"}).ok,
                   "the dashboard to answer", timeout=60, ignore=(requests.ConnectionError, requests.Timeout))
    except BaseException:
        process.kill()
        raise
    return process, url


def stop_dashboard(process: subprocess.Popen, port: int) -> None:
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    with socket.socket() as s:  # nothing answers there any more
        assert s.connect_ex(("127.0.0.1", port)) != 0


def listeners(port: int) -> list[str]:
    """The addresses sockets listen on at `port` (IPv4 and IPv6), from the kernel's tables (Linux)."""
    found = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for row in Path(table).read_text().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                words = bytes.fromhex(address)  # 32-bit words in the host's byte order
                raw = b"".join(words[i:i + 4][::-1] for i in range(0, len(words), 4))
                found.append(socket.inet_ntop(family, raw))
    return found


@pytest.fixture(params=["sqlite", "journal"])
def ran_study(study_env, tmp_path, request) -> StudyEnv:
    """The tiny study with three finished trials (Optuna's own, no training) in SQLite or the journal file."""
    env = study_env if request.param == "sqlite" else study_env.replace(storage=str(tmp_path / "optuna.journal"))
    env.write_study()
    study = optuna.create_study(study_name="tiny", storage=store.make_storage(env.storage), direction="maximize")
    study.optimize(lambda trial: trial.suggest_float("lr", 1e-3, 1e-2, log=True), n_trials=3)
    return env


def test_the_dashboard_serves_the_study_on_loopback_only_and_stops_on_sigterm(ran_study, tmp_path):
    port = free_port()
    process, url = start_dashboard(ran_study, port, tmp_path / "dashboard")
    try:
        study_id = store.make_storage(ran_study.storage).get_study_id_from_name("tiny")
        assert url == f"http://127.0.0.1:{port}/dashboard/studies/{study_id}"
        assert listeners(port) == ["127.0.0.1"]
        served = requests.get(f"http://127.0.0.1:{port}/api/studies/{study_id}?after=0", timeout=30).json()
        assert served["name"] == "tiny"
        assert [t["number"] for t in served["trials"]] == [0, 1, 2]
        assert {t["state"] for t in served["trials"]} == {"Complete"}
    finally:
        stop_dashboard(process, port)


def test_a_page_of_another_site_can_neither_read_nor_change_the_studies(ran_study, tmp_path):
    """DNS rebinding: a page of rebind.attacker.example whose name now resolves to 127.0.0.1 sends its requests
    with that name in Host; a page of any other site sends its own Origin with the changes it asks for."""
    port = free_port()
    process, _ = start_dashboard(ran_study, port, tmp_path / "dashboard")
    api = f"http://127.0.0.1:{port}/api/studies"
    storage = store.make_storage(ran_study.storage)
    study_id = storage.get_study_id_from_name("tiny")
    try:
        rebound = {"Host": f"rebind.attacker.example:{port}"}
        listing = requests.get(api, headers=rebound, timeout=30)
        assert listing.status_code == 403 and "tiny" not in listing.text, listing.text
        assert "DNS rebinding" in listing.text
        assert requests.delete(f"{api}/{study_id}", headers=rebound, timeout=30).status_code == 403
        other_port = {"Host": f"127.0.0.1:{port + 1}"}  # the port is part of the address too
        assert requests.get(api, headers=other_port, timeout=30).status_code == 403
        cross_site = {"Origin": "http://rebind.attacker.example"}  # the Host a page of that site sends: ours
        assert requests.delete(f"{api}/{study_id}", headers=cross_site, timeout=30).status_code == 403
        assert requests.post(f"{api}/{study_id}/rename", json={"study_name": "gone"}, headers=cross_site,
                             timeout=30).status_code == 403
        assert [s.study_name for s in storage.get_all_studies()] == ["tiny"]
        assert len(storage.get_all_trials(study_id)) == 3

        # The dashboard's own pages, by any of this machine's names for itself, still read and change them.
        for name in ("127.0.0.1", "localhost"):
            own = {"Host": f"{name}:{port}"}
            assert [s["study_name"] for s in requests.get(api, headers=own, timeout=30).json()["study_summaries"]] \
                == ["tiny"]
            note = requests.put(f"{api}/{study_id}/note", json={"version": 1 + (name == "localhost"),
                                                                 "body": f"from {name}"},
                                headers={**own, "Origin": f"http://{name}:{port}"}, timeout=30)
            assert note.status_code == 204, note.text
        assert "from localhost" in str(storage.get_study_system_attrs(study_id))
    finally:
        stop_dashboard(process, port)


# --------------------------------------------------------------------------------------------------
# In headless Chromium


@pytest.mark.browser
def test_the_printed_address_opens_the_study_in_chromium(study_env, tmp_path):
    from selenium.webdriver.common.by import By

    study_env.write_study(trials=2)
    assert study_env.run("search") == 0
    study = study_env.load()
    assert len(study.trials) == 2
    screenshots = Path(os.environ.get("SCREENSHOT_DIR", tmp_path))
    screenshots.mkdir(parents=True, exist_ok=True)
    port = free_port()
    process, url = start_dashboard(study_env, port, tmp_path / "dashboard")
    assert listeners(port) == ["127.0.0.1"]
    browser = chromium()
    console = []
    try:
        def page_showing(*markers: str) -> str | None:
            text = browser.find_element(By.TAG_NAME, "body").text
            return text if all(marker in text for marker in markers) else None

        def showing(what: str, *markers: str) -> str:
            return wait_until(lambda: page_showing(*markers), f"the dashboard to show {what}", timeout=60,
                              ignore=(Exception,), interval=0.5)

        study_id = store.make_storage(study_env.storage).get_study_id_from_name("tiny")
        browser.get(url)
        showing("the study", f"tiny (id={study_id})", f"Best Trial (number={study.best_trial.number})", "History")
        wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, ".js-plotly-plot"), "the history chart",
                   timeout=60, ignore=(Exception,))
        browser.save_screenshot(str(screenshots / "dashboard_study.png"))
        console += browser.get_log("browser")

        browser.get(f"{url}/trials")
        showing("the trials", "2 Trials", "Trial 0", "Trial 1", "Complete")
        browser.save_screenshot(str(screenshots / "dashboard_trials.png"))
        console += browser.get_log("browser")

        origin = f"http://127.0.0.1:{port}/"
        fetched = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert fetched and all(name.startswith(origin) for name in fetched), fetched  # nothing from the network
        browser.execute_script("console.error('probe: the console is read')")
        console += browser.get_log("browser")
    finally:
        browser.quit()
        stop_dashboard(process, port)
    severe = [entry["message"] for entry in console if entry["level"] == "SEVERE"]
    assert len(severe) == 1 and "probe: the console is read" in severe[0], severe
