"""`python -m pipeline ui` in a real process, for the REST and browser tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(env, study: str, port: int) -> tuple[subprocess.Popen, str]:
    """`python -m pipeline ui` on a StudyEnv's stores (conftest.py) in a real process; returns it and the URL it
    printed."""
    process = subprocess.Popen(env.command("ui", "--port", str(port), study=study), stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True,
                               env=dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="300"))
    line = process.stdout.readline()
    url = next(word for word in line.split() if word.startswith("http://"))
    try:
        wait_for_health(port)
    except AssertionError:
        process.kill()
        raise
    return process, url


def wait_for_health(port: int, timeout: float = 90) -> None:
    """Until an MLflow server on 127.0.0.1:port answers /health."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                return
        except (requests.ConnectionError, requests.Timeout):
            pass  # not listening yet, or still starting
        time.sleep(0.5)
    raise AssertionError(f"the MLflow server on port {port} did not come up within {timeout:.0f} s")


def stop_ui(process: subprocess.Popen, port: int) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)
    with socket.socket() as s:  # the server (a grandchild) is gone too: the port is free again
        assert s.connect_ex(("127.0.0.1", port)) != 0
