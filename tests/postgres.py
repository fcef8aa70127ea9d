"""A private PostgreSQL server on 127.0.0.1 for the scale-out tests: the Debian package's binaries, a
throw-away cluster in a temporary folder, password authentication, stopped and deleted afterwards.

`make test-scale` (and so `.ci/run`) installs the `postgresql` package when its binaries are missing.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import psycopg
from psycopg import sql

USER, PASSWORD = "pipeline", "scale-out-test"


@dataclass
class Server:
    port: int
    directory: Path
    run_as: list[str]  # prefix that runs a PostgreSQL binary as a non-root user (it refuses root)
    bin_dir: Path

    def url(self, database: str, user: str = USER, password: str = PASSWORD) -> str:
        return f"postgresql://{user}:{quote(password, safe='')}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str, owner: str = USER, password: str = PASSWORD) -> str:
        """A new database owned by `owner` (USER, or a role made by `create_user` with `password`); its URL."""
        # autocommit: CREATE DATABASE cannot run inside a transaction
        with psycopg.connect(self.url("postgres"), autocommit=True) as connection:
            connection.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name),
                                                                             sql.Identifier(owner)))
        return self.url(name, owner, password)

    def create_user(self, name: str, password: str) -> None:
        """Another login role, with a password of the test's choosing."""
        with psycopg.connect(self.url("postgres"), autocommit=True) as connection:
            connection.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(name),
                                                                                 sql.Literal(password)))

    def stop(self) -> None:
        subprocess.run([*self.run_as, str(self.bin_dir / "pg_ctl"), "stop", "-D", str(self.directory / "data"),
                        "-m", "fast", "-w"], capture_output=True, timeout=60)
        shutil.rmtree(self.directory, ignore_errors=True)


def server_binaries() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if not found:
        raise RuntimeError("PostgreSQL server binaries not found under /usr/lib/postgresql: run `make test-scale`, "
                           "which installs the Debian package `postgresql`")
    return Path(found[-1]).parent


def start(port: int) -> Server:
    bin_dir = server_binaries()
    directory = Path(tempfile.mkdtemp(prefix="pipeline-postgres-"))
    run_as: list[str] = []
    if os.geteuid() == 0:  # postgres will not run as root: use the package's own `postgres` account
        account = pwd.getpwnam("postgres")
        os.chown(directory, account.pw_uid, account.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    server = Server(port, directory, run_as, bin_dir)
    password_file = directory / "password"
    password_file.write_text(PASSWORD)
    if run_as:
        os.chown(password_file, pwd.getpwnam("postgres").pw_uid, -1)
    subprocess.run([*run_as, str(bin_dir / "initdb"), "-D", str(directory / "data"), "-U", USER,
                    f"--pwfile={password_file}", "--auth=scram-sha-256", "--encoding=UTF8", "--no-sync"],
                   check=True, capture_output=True, timeout=120)
    options = f"-h 127.0.0.1 -p {port} -k {directory} -c fsync=off -c max_connections=200"
    subprocess.run([*run_as, str(bin_dir / "pg_ctl"), "start", "-D", str(directory / "data"), "-w", "-t", "60",
                    "-l", str(directory / "server.log"), "-o", options], check=True, capture_output=True, timeout=90)
    deadline = time.monotonic() + 30
    while True:
        try:
            psycopg.connect(server.url("postgres")).close()
            return server
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                server.stop()
                raise
            time.sleep(0.5)
