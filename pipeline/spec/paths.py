"""Where the project keeps its files, all resolved from the project root so any working directory works.

Every default location is named here once: the data folder, study files, the default Optuna and
MLflow stores, exports. STORAGE and MLFLOW_TRACKING_URI override the stores (store/storage.py,
tracking/connection.py).
"""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DATA_ROOT = PROJECT_ROOT / "data"
STUDIES_DIR = PROJECT_ROOT / "studies"
EXPORTS_DIR = PROJECT_ROOT / "exports"
MLRUNS_DIR = PROJECT_ROOT / "mlruns"
REPORTS_DIR = PROJECT_ROOT / "reports"  # make report (and every make search): reports/<study>.html

# Optuna: one SQLite file; several worker processes on one host share Optuna's journal file instead
# (SQLite's locking is not meant for parallel writers, the journal file is).
DEFAULT_STORAGE = f"sqlite:///{STUDIES_DIR / 'optuna.db'}"
DEFAULT_JOURNAL = STUDIES_DIR / "optuna.journal"

# MLflow: a SQLite store with the artifacts beside it.
DEFAULT_TRACKING_URI = f"sqlite:///{MLRUNS_DIR / 'mlflow.db'}"
DEFAULT_ARTIFACT_ROOT = MLRUNS_DIR / "artifacts"
