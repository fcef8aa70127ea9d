"""`python -m pipeline <command>`: arguments, dispatch to the module that owns the command, exit codes.

Exit codes: 0 done, 2 bad input (a one-line message says what and how to fix it), 1 our bug, a failed
study or a replay that differs, 128 + N after signal N.

Each command's module is imported when that command runs (the one place imports sit inside functions):
training modules load torch, which costs seconds, and `make data`, `make studies` or a mistyped study
name should answer without it.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from pipeline.console import lines, search_view, tables, train_view
from pipeline.infra.urls import shown
from pipeline.spec import hparams, paths, sources, studies
from pipeline.spec.errors import BadInput
from pipeline.spec.stop_reason import StopReason


def _cmd_data(args: argparse.Namespace) -> int:
    from pipeline.data import landing

    tables.landed(landing.make_data(args.dataset, args.root, args.source, log=lines.note))
    return 0


def parse_assignment(text: str) -> tuple[str, object]:
    """`key=value` with the value read as a TOML literal (`3`, `1e-3`, `true`, `[32, 64]`), else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise BadInput(f"--set {text!r}: expected key=value, e.g. --set lr=0.01 or --set cnn_channels=[32,64]")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    except RecursionError:  # arrays nested thousands deep: no parameter takes them
        raise BadInput(f"--set {key.strip()}=...: the value is nested too deeply to read; expected a number, a "
                       "word or a flat list, e.g. --set cnn_channels=[32,64]") from None
    return key.strip(), value


def _cmd_train(args: argparse.Namespace) -> int:
    from pipeline.commands import train
    from pipeline.commands.studies import baseline_params

    # A study's first baseline trial (on the study's dataset and subset), or the family's classic.
    if args.study:
        spec = studies.load(args.study)
        params = baseline_params(spec)
        options = train.TrainOptions(spec.data, args.root, args.device, args.seed, args.threads, spec.val_size,
                                     args.train_limit or spec.train_limit, args.val_limit or spec.val_limit,
                                     args.checkpoint)
    else:
        params = dict(hparams.CLASSIC[args.model])
        options = train.TrainOptions(args.dataset, args.root, args.device, args.seed, args.threads, args.val_size,
                                     args.train_limit, args.val_limit, args.checkpoint)
    params.update(parse_assignment(item) for item in args.set)
    resolved = hparams.resolve_params(params)  # bad parameters stop here, before the data is loaded
    with train_view.TrainView(resolved["epochs"]) as view:
        result = train.train_one(resolved, options, view)
    view.result(result)
    return 0


def _started_at(text: str) -> float:
    """--started-at: a time.time() of the last hour (a planned search's clock counts from it)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not time.time() - 3600 <= value <= time.time() + 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected the Unix time the command began, within the last hour "
                                         "(make passes it); leave --started-at out to count from now")
    return value


def _study(args: argparse.Namespace) -> studies.StudySpec:
    """The study file with the command line's overrides (trials, timeout, epochs, subsets)."""
    spec = studies.load(args.study, args.studies_dir)
    return studies.with_overrides(spec, trials=getattr(args, "trials", None),
                                  timeout_minutes=getattr(args, "timeout", None), epochs=args.epochs,
                                  minutes=getattr(args, "minutes", None),
                                  train_limit=args.train_limit, val_limit=args.val_limit,
                                  baseline=[] if getattr(args, "no_baselines", False) else None)


def _cmd_search(args: argparse.Namespace) -> int:
    spec = _study(args)  # a bad study file stops here, before torch is loaded
    from pipeline.commands import search
    from pipeline.search import workers
    from pipeline.search.options import SearchOptions

    options = SearchOptions(args.storage, args.fresh, args.workers, args.worker, args.device, args.threads,
                            args.root, args.studies_dir, args.tracking, tuple(args.worker_program),
                            args.reports_dir, args.exports_dir, args.deadline,
                            time.time() if args.started_at is None else args.started_at)
    view = workers.EventView() if args.worker is not None else search_view.SearchView()
    outcome = search.run_search(spec, options, view)
    if args.worker is None:
        tables.search_result(spec, outcome)
    if outcome.stop_reason == StopReason.INTERRUPTED:
        return 128 + outcome.stop_signal
    return 1 if outcome.stop_reason == StopReason.FAILED else 0


def _cmd_plan(args: argparse.Namespace) -> int:
    spec = _study(args)
    from pipeline.commands import plan
    from pipeline.search.options import SearchOptions

    options = SearchOptions(args.storage, workers=args.workers, device=args.device, threads=args.threads,
                            root=args.root, studies_dir=args.studies_dir)
    for line in plan.plan_study(spec, options, lines.note):
        lines.say(line)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    spec = studies.load(args.study, args.studies_dir)
    from pipeline import store
    from pipeline.reports import reportpage

    storage = store.open_storage(args.storage, spec.name)
    study = store.find_study(spec, storage.backend)  # StudyError (exit 2) when the study was never run
    page = reportpage.write(spec, study, storage.backend, args.reports_dir, args.exports_dir, args.studies_dir)
    lines.say(f"report of {study.study_name!r}: {page} ({page.stat().st_size / 1e6:.1f} MB, opens offline in any "
              "browser)")
    return 0


def _cmd_replay(args: argparse.Namespace) -> int:
    spec = _study(args)
    from pipeline.commands import replay

    outcome = replay.replay_trial(spec, args.storage, args.trial, args.root, args.device, args.threads, args.repeat,
                                  args.rung)
    name = lines.trial_name(args.trial, args.trial if outcome.repeat is not None else None, outcome.repeat or 0)
    tables.replay_result(name + (f" rung {args.rung}" if args.rung else ""), outcome.epochs, outcome.differences)
    return 1 if outcome.differences else 0


def _cmd_export_best(args: argparse.Namespace) -> int:
    spec = studies.load(args.study, args.studies_dir)
    from pipeline.commands import export
    from pipeline.tracking import connection

    client = connection.connect() if args.tracking else None
    if client is not None:
        lines.say(f"tracking to MLflow at {shown(connection.tracking_uri())}")
    started = time.perf_counter()
    try:
        destination = export.export_best(spec, args.storage, args.root, client, args.out, args.force, log=lines.say,
                                         trial=args.trial)
    except export.ExportFailed as exc:
        lines.failed(f"export failed, nothing written: {exc}")
        return 1
    tables.exported(destination, time.perf_counter() - started)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    if not args.images:
        raise BadInput("predict: no images given; pass IMAGES=\"a.png b.png\" (make predict) or file paths")
    from pipeline.commands import predict

    found, errors = predict.predict(args.export, args.images)
    tables.predictions(args.export, found, errors)
    return 2 if errors else 0


def _cmd_studies(args: argparse.Namespace) -> int:
    from pipeline.commands.studies import study_states

    tables.studies_table(study_states(args.studies_dir, args.storage))
    return 0


def _cmd_ui(args: argparse.Namespace) -> int:
    spec = studies.load(args.study, args.studies_dir) if args.study else None
    from pipeline.commands import server

    return server.ui(spec, args.storage, args.port, lines.say)


def _cmd_dashboard(args: argparse.Namespace) -> int:
    spec = studies.load(args.study, args.studies_dir)
    from pipeline.commands import dashboard

    return dashboard.dashboard(spec, args.storage, args.host, args.port, args.insecure, lines.say, lines.note)


def _cmd_server(args: argparse.Namespace) -> int:
    from pipeline.commands import server

    return server.tracking_server(args.host, args.port, args.backend, args.artifacts, args.allowed_hosts, args.auth,
                                  args.insecure, lines.say, lines.note, tls_cert=args.tls_cert, tls_key=args.tls_key)


STORAGE_HELP = ("Optuna storage: a URL (sqlite:///..., postgresql://...) or a .journal file (default: $STORAGE, else "
                "studies/optuna.db, or studies/optuna.journal for a study run with several workers)")


def _add_stored_study_arguments(p: argparse.ArgumentParser) -> None:
    """A study file and the Optuna storage that holds its study: what every command reading a study takes."""
    p.add_argument("--study", required=True, help="a study file name in studies/, e.g. cnn")
    p.add_argument("--storage", default=None, help=STORAGE_HELP)
    p.add_argument("--studies-dir", type=Path, default=paths.STUDIES_DIR, help=argparse.SUPPRESS)


def _add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reports-dir", type=Path, default=paths.REPORTS_DIR, help="where the report page goes "
                   "(default: reports/)")
    p.add_argument("--exports-dir", type=Path, default=paths.EXPORTS_DIR, help=argparse.SUPPRESS)


def _add_study_arguments(p: argparse.ArgumentParser, with_budget: bool) -> None:
    _add_stored_study_arguments(p)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per trial (default: all cores)")
    p.add_argument("--root", type=Path, default=paths.DATA_ROOT, help="data folder (default: data/)")
    p.add_argument("--epochs", type=int, default=None, help="override the study's epoch budget")
    p.add_argument("--train-limit", type=int, default=None, help="override: train on a subset of this many images")
    p.add_argument("--val-limit", type=int, default=None, help="override: validate on this many images")
    p.add_argument("--trials", type=int, default=None, help="override the total trial budget" if with_budget
                   else argparse.SUPPRESS)
    p.add_argument("--timeout", type=float, default=None, help="override an unplanned study's timeout_minutes"
                   if with_budget else argparse.SUPPRESS)
    p.add_argument("--minutes", type=float, default=None, help="plan the whole run (search, champion phase, report) "
                   "to this many minutes on this machine" if with_budget else argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    _add_training_commands(commands)
    _add_study_commands(commands)
    _add_serving_commands(commands)
    return parser


def _add_training_commands(commands: Any) -> None:
    """data, train."""
    p = commands.add_parser("data", help="land and verify datasets under data/ (offline sources first)")
    p.add_argument("--dataset", default="all", choices=["all", *sources.builtin_names()],
                   help="all: MNIST and Fashion-MNIST; CIFAR needs its archive in data/ or the internet")
    p.add_argument("--source", default="auto", choices=sources.SOURCES,
                   help="auto: present files, then the offline package, then torchvision's download")
    p.add_argument("--root", type=Path, default=paths.DATA_ROOT, help="data folder (default: data/)")
    p.set_defaults(run=_cmd_data)

    p = commands.add_parser("train", help="one training run of a model family's baseline (+ --set overrides)")
    p.add_argument("--model", default="cnn", choices=list(hparams.FAMILIES))
    p.add_argument("--study", default=None, help="train this study's first baseline trial instead of --model's")
    p.add_argument("--dataset", default="mnist", choices=sources.builtin_names())
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a parameter, e.g. --set lr=0.01 --set cnn_channels=[32,64] (repeatable)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--val-size", type=int, default=sources.DEFAULT_VAL_SIZE,
                   help="validation images carved from the training file")
    p.add_argument("--train-limit", type=int, default=None, help="train on a seeded subset of this many images")
    p.add_argument("--val-limit", type=int, default=None, help="validate on a seeded subset of this many images")
    p.add_argument("--checkpoint", type=Path, default=None, help="save every epoch here; resume if it exists")
    p.add_argument("--root", type=Path, default=paths.DATA_ROOT, help="data folder (default: data/)")
    p.set_defaults(run=_cmd_train)


def _add_study_commands(commands: Any) -> None:
    """search, replay, studies."""
    p = commands.add_parser("search", help="run or resume the Optuna study of studies/<STUDY>.toml")
    _add_study_arguments(p, with_budget=True)
    p.add_argument("--fresh", action="store_true", help="start a new version of the study (the old one is kept)")
    p.add_argument("--no-baselines", action="store_true", help="queue none of the study file's [[baseline]] trials: "
                   "the sampler starts cold (what a study of your own starts with; make bench-search measures it)")
    p.add_argument("--workers", type=_worker_count, default="auto", help="worker processes on this host, or auto "
                   "(the default: one per GPU, else one 1-thread worker per CPU core up to 4, one for a study in a "
                   "SQLite file); GPUs are shared out round robin, CPU threads split between them")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # set by the coordinator
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)  # a planned run's, for a worker
    p.add_argument("--started-at", type=_started_at, default=None, metavar="UNIX_TIME",
                   help="when the command began (`make search` passes its own start, so a fresh clone's set-up "
                   "counts against the study's minutes); default: now")
    p.add_argument("--tracking", action=argparse.BooleanOptionalAction, default=True,
                   help="record trials in MLflow ($MLFLOW_TRACKING_URI, default sqlite mlruns/mlflow.db)")
    _add_report_arguments(p)
    p.set_defaults(run=_cmd_search)

    p = commands.add_parser("report", help="the study's report page -> reports/<study>.html (self-contained)")
    _add_stored_study_arguments(p)
    _add_report_arguments(p)
    p.set_defaults(run=_cmd_report)

    p = commands.add_parser("replay", help="retrain one finished trial and compare every recorded metric")
    _add_study_arguments(p, with_budget=False)
    p.add_argument("--trial", type=int, required=True)
    p.add_argument("--repeat", type=int, default=None,
                   help="a champion-phase run: this repeat of the trial's configuration (in a study planned to its "
                        "minutes every repeat is one; in another, 0 is the trial itself)")
    p.add_argument("--rung", type=int, default=None, help="a planned search's run of the trial's configuration at "
                   "this rung (0: the trial itself)")
    p.set_defaults(run=_cmd_replay)

    p = commands.add_parser("plan", help="print the plan of a study's minutes on this machine, without training")
    _add_study_arguments(p, with_budget=True)
    p.add_argument("--workers", type=_worker_count, default="auto", help="worker processes at rung 0 (default auto)")
    p.add_argument("--no-baselines", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(run=_cmd_plan)

    p = commands.add_parser("studies", help="list the studies with trials done, best value and state")
    p.add_argument("--storage", default=None)
    p.add_argument("--studies-dir", type=Path, default=paths.STUDIES_DIR, help=argparse.SUPPRESS)
    p.set_defaults(run=_cmd_studies)


def _add_serving_commands(commands: Any) -> None:
    """export-best, predict, ui, dashboard, server."""
    p = commands.add_parser("export-best", help="the study's champion -> exports/<study>/, verified by a fresh process")
    _add_stored_study_arguments(p)
    p.add_argument("--force", action="store_true", help="replace an existing export")
    p.add_argument("--trial", type=int, default=None, help="export this complete trial instead of the champion, to "
                   "exports/<study>-trial-<n>/ (retrained from its recorded params and seed)")
    p.add_argument("--out", type=Path, default=paths.EXPORTS_DIR,
                   help="parent folder of the export (default: exports/)")
    p.add_argument("--root", type=Path, default=paths.DATA_ROOT, help="data folder (default: data/)")
    p.add_argument("--tracking", action=argparse.BooleanOptionalAction, default=True,
                   help="take the champion from the MLflow registry and log the test accuracy back")
    p.set_defaults(run=_cmd_export_best)

    p = commands.add_parser("predict", help="classify PNG/JPEG files with an export")
    p.add_argument("--export", type=Path, required=True, help="an export folder, e.g. exports/cnn")
    p.add_argument("images", nargs="*", type=Path, help="image files (any size or colour)")
    p.set_defaults(run=_cmd_predict)

    p = commands.add_parser("ui", help="the MLflow UI on 127.0.0.1, opened on a study's runs table")
    p.add_argument("--study", default=None, help="open on this study's runs (default: the experiments list)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--storage", default=None, help="Optuna storage URL, to find the study's current version")
    p.add_argument("--studies-dir", type=Path, default=paths.STUDIES_DIR,
                   help=argparse.SUPPRESS)
    p.set_defaults(run=_cmd_ui)

    p = commands.add_parser("dashboard", help="optuna-dashboard on 127.0.0.1, opened on a study's page")
    _add_stored_study_arguments(p)
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine "
                   "only); any other needs --insecure")
    p.add_argument("--insecure", action="store_true", help="listen on another address: the dashboard has no login, "
                   "anyone who reaches the port can rename and delete studies and trials")
    p.set_defaults(run=_cmd_dashboard)

    p = commands.add_parser("server", help="an MLflow tracking server that searches on other hosts can log to")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine "
                   "only); any other needs --auth or --insecure")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--auth", type=Path, default=None, help="MLflow's basic-auth login with the settings of this .ini "
                   "file (README: Running on many machines); clients log in with MLFLOW_TRACKING_USERNAME/PASSWORD")
    p.add_argument("--insecure", action="store_true", help="listen on another address without a login: anyone who "
                   "reaches the port can read, change and delete runs and models")
    p.add_argument("--backend", default=None, help="database URI (default: $MLFLOW_BACKEND_STORE_URI, else "
                   "$MLFLOW_TRACKING_URI or sqlite mlruns/mlflow.db), e.g. postgresql://...; a password in it is safer "
                   "in $MLFLOW_BACKEND_STORE_URI than here, where the process list shows it")
    p.add_argument("--artifacts", type=Path, default=None, help="where the server keeps artifacts "
                   "(default: mlruns/artifacts, or beside the SQLite file)")
    p.add_argument("--allowed-hosts", default=None, help="more names clients may reach it by, comma-separated "
                   "(localhost, private IP addresses and this host's names are always allowed), e.g. mlflow.lab")
    p.add_argument("--tls-cert", type=Path, default=None, help="serve HTTPS only, with this PEM certificate (and "
                   "--tls-key), so logins do not cross the network in clear text (README: Running on many machines)")
    p.add_argument("--tls-key", type=Path, default=None,
                   help="the certificate's PEM private key, unencrypted (chmod 600)")
    p.set_defaults(run=_cmd_server)


# How a worker process runs this program (tests run it through a script that registers a test dataset).
WORKER_PROGRAM = (sys.executable, "-m", "pipeline")


DEVICE_FORMS = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _worker_count(text: str) -> int | str:
    """--workers: a number, or auto."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of worker processes or auto") from None


def check_arguments(args: argparse.Namespace) -> None:
    """What argparse's types cannot say: ranges and device names, checked before anything is opened."""
    for flag in ("threads", "workers", "port"):
        value = getattr(args, flag, None)
        if isinstance(value, int) and value < 1:
            raise BadInput(f"--{flag} {value}: expected a whole number >= 1 ({flag.upper()}=... in make)")
    if getattr(args, "port", None) is not None and args.port > 65535:
        raise BadInput(f"--port {args.port}: expected a port number from 1 to 65535")
    device = getattr(args, "device", None)
    if device is not None and not DEVICE_FORMS.fullmatch(device):
        raise BadInput(f"--device {device!r}: expected auto, cpu, mps, cuda or cuda:<index>, e.g. --device cuda:1")
    hparams.machine_precision()  # a misspelt PIPELINE_PRECISION stops here, not inside the first trial


def main(argv: list[str] | None = None, worker_program: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.worker_program = worker_program or WORKER_PROGRAM  # this call's own: nothing sticks to the module
    try:
        check_arguments(args)
        return args.run(args)
    except BadInput as exc:
        lines.error(str(exc))
        return 2
    except KeyboardInterrupt:
        lines.note("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
