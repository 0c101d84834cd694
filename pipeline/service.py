"""A tracking service for a team or a cluster: PostgreSQL plus `mlflow server`, started and
stopped with one command each (`pipeline service start|stop`).

PostgreSQL holds MLflow's runs (database `mlflow`) and shared Optuna studies (database
`optuna`); artifacts go to a directory (or, by `--artifacts`, any destination `mlflow server`
accepts, e.g. s3://bucket/path). Both bind to loopback by default and trust local connections:
reachable from other machines only through what you put in front (an SSH tunnel, or `--host`
on a private network with PostgreSQL's pg_hba.conf tightened). Stages need only
`MLFLOW_TRACKING_URI`; the search stages take the Optuna URL as `search.storage`.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import requests

from pipeline.config import ConfigError

STATE_FILE = "service.json"
DRIVER = "postgresql+psycopg"  # SQLAlchemy's dialect for psycopg 3


@dataclass(frozen=True)
class Service:
    root: str
    host: str
    port: int
    db_port: int
    mlflow_pid: int

    @property
    def tracking_uri(self) -> str:
        return f"http://{self.host}:{self.port}"

    def database_url(self, name: str) -> str:
        return f"{DRIVER}://postgres@127.0.0.1:{self.db_port}/{name}"


def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its tools as the `postgres` user then."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _run(cmd: list[str], what: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        raise ConfigError(f"pipeline service: {what} failed: {last}")


def start(root: Path, host: str = "127.0.0.1", port: int = 5000, db_port: int = 5433,
          artifacts: str | None = None, timeout_s: float = 60.0) -> Service:
    root = root.resolve()
    if (root / STATE_FILE).is_file():
        raise ConfigError(f"pipeline service: already started in {root} (stop it first: pipeline service stop)")
    for tool in ("initdb", "pg_ctl", "createdb"):
        if shutil.which(tool) is None:
            raise ConfigError(f"pipeline service: `{tool}` not found; install the PostgreSQL server binaries")
    data, logs = root / "postgres", root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(logs, "postgres")
    if not (data / "PG_VERSION").is_file():
        _run(_as_postgres(["initdb", "-D", str(data), "--auth=trust", "-U", "postgres", "--no-sync"]), "initdb")
    _run(_as_postgres(["pg_ctl", "-D", str(data), "-l", str(logs / "postgres.log"), "-w", "-o",
                       f"-p {db_port} -k {root} -c listen_addresses=127.0.0.1", "start"]), "starting PostgreSQL")
    for name in ("mlflow", "optuna"):
        subprocess.run(_as_postgres(["createdb", "-h", "127.0.0.1", "-p", str(db_port), "-U", "postgres", name]),
                       capture_output=True)  # exists already on a restart: fine
    destination = artifacts or str(root / "artifacts")
    service = Service(str(root), host, port, db_port, 0)
    log = open(logs / "mlflow.log", "ab")
    mlflow = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", service.database_url("mlflow"),
         "--artifacts-destination", destination, "--host", host, "--port", str(port), "--workers", "2"],
        stdout=log, stderr=log, start_new_session=True)
    service = Service(str(root), host, port, db_port, mlflow.pid)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if mlflow.poll() is not None:
            _stop_postgres(root)
            raise ConfigError(f"pipeline service: mlflow server exited ({mlflow.returncode}); see {logs / 'mlflow.log'}")
        try:
            if requests.get(service.tracking_uri + "/health", timeout=2).status_code == 200:
                (root / STATE_FILE).write_text(json.dumps(asdict(service)))
                return service
        except requests.RequestException:
            pass
        time.sleep(0.5)
    stop(root, service)
    raise ConfigError(f"pipeline service: mlflow server did not answer within {timeout_s:g} s; see {logs / 'mlflow.log'}")


def load(root: Path) -> Service:
    path = root.resolve() / STATE_FILE
    if not path.is_file():
        raise ConfigError(f"pipeline service: none started in {root.resolve()}")
    return Service(**json.loads(path.read_text()))


def stop(root: Path, service: Service | None = None) -> None:
    root = root.resolve()
    service = service or load(root)
    try:
        os.killpg(service.mlflow_pid, signal.SIGTERM)  # the server and its workers
    except ProcessLookupError:
        pass
    for _ in range(100):
        try:
            os.waitpid(service.mlflow_pid, os.WNOHANG)  # reap it when this process started it
        except ChildProcessError:
            pass
        if not _group_running(service.mlflow_pid):
            break
        time.sleep(0.1)
    _stop_postgres(root)
    (root / STATE_FILE).unlink(missing_ok=True)


def _group_running(pgid: int) -> bool:
    """Whether a process of group `pgid` still runs: zombies do not count (a container's PID 1 may
    never reap the server's workers)."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _stop_postgres(root: Path) -> None:
    subprocess.run(_as_postgres(["pg_ctl", "-D", str(root / "postgres"), "-m", "fast", "-w", "stop"]),
                   capture_output=True)
