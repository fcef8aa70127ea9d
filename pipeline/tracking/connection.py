"""Connecting to MLflow: the tracking store's URI, where a new experiment keeps its artifacts, opening a client
that fails fast (before any training) when the store cannot be reached, and finding an experiment."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import mlflow
import requests
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipeline.infra import sqlitecheck
from pipeline.infra.concurrency import open_store
from pipeline.infra.urls import error_line, shown
from pipeline.spec import paths
from pipeline.spec.errors import BadInput


def quiet_mlflow() -> None:
    """MLflow's settings for a command-line tool, made before the first MLflow call."""
    # MLflow announces the SQLite schema migrations at INFO level and draws a progress bar per download.
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # A database error is logged by MLflow with its traceback and SQL, then raised: we report it in one line.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # A server that stops answering costs 2 + 4 + 8 s per call before the error surfaces, not MLflow's ~4 minutes.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    # With a tracking server MLflow prints two "View run ..." lines per closed run; our own output says where
    # the runs are, and a worker's stdout is its event stream.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or paths.DEFAULT_TRACKING_URI


def artifact_root(uri: str) -> Path | None:
    """Where a new experiment keeps its artifacts: beside a SQLite file, under mlruns/ for another database,
    and wherever the server decides (None) for an `mlflow server`."""
    if uri.startswith(("http://", "https://", "databricks")):
        return None
    if (database := sqlitecheck.sqlite_path(uri)) is not None:
        return database.parent / "artifacts"
    return paths.DEFAULT_ARTIFACT_ROOT


def connect(uri: str | None = None) -> MlflowClient:
    """Open the tracking store, failing fast (before any training) with a clear message if it cannot be reached."""
    quiet_mlflow()
    uri = uri or tracking_uri()
    hint = "check MLFLOW_TRACKING_URI (unset it to use the local store mlruns/mlflow.db)"
    if uri.startswith(("http://", "https://")):
        # One quick probe (the client itself would retry for minutes). Any HTTP answer means reachable:
        # credentials and the like are the real client's to check, and it reports them.
        insecure = os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true"
        verify = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or not insecure
        try:
            requests.get(f"{uri.rstrip('/')}/health", timeout=5, verify=verify)
        except requests.RequestException as exc:
            raise BadInput(f"MLflow tracking server {shown(uri)} is unreachable ({type(exc).__name__}); "
                           f"start it (make server) or {hint}") from None
    else:
        sqlitecheck.prepare(uri, "MLflow tracking store")  # damaged: one line now, not a traceback mid-search
    mlflow.set_tracking_uri(uri)

    def open_() -> MlflowClient:
        client = MlflowClient(uri)
        client.search_experiments(max_results=1)  # a new SQLite store gets its schema here
        return client

    try:
        return open_store(open_)
    except Exception as exc:  # unwritable or locked file, refused connection, wrong credentials
        reason = error_line(exc, uri)
        if _refused_login(exc):
            hint = ("the server asks for a login: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an "
                    "account of its basic-auth user store")
        raise BadInput(f"MLflow tracking store {shown(uri)} cannot be opened: {reason}; {hint}") from None


def _refused_login(exc: Exception) -> bool:
    """Did an `mlflow server` with a login turn the request away (no or wrong credentials)?"""
    return isinstance(exc, MlflowException) and exc.get_http_status_code() in (401, 403)


def experiment_id(client: MlflowClient, name: str) -> str | None:
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else None
