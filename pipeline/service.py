"""A tracking service for a team or a cluster: PostgreSQL plus `mlflow server`, started and
stopped with one command each (`pipeline service start|stop`).

PostgreSQL holds MLflow's runs (database `mlflow`) and shared Optuna studies (database
`optuna`); artifacts go to a directory (or, by `--artifacts`, any destination `mlflow server`
accepts, e.g. s3://bucket/path). Both bind to loopback by default. PostgreSQL authenticates every
connection (scram-sha-256) with a password generated at the first start and kept in DIR/password
(mode 0600): the Optuna URL printed by `start` carries it; hand it to workers on other machines
as you would any secret (the file, or PGPASSWORD). Stages need only `MLFLOW_TRACKING_URI`; the
search stages take the Optuna URL as `search.storage`.

Every process is recorded in DIR/service.json as it starts, so `stop` finds what an interrupted
`start` left; `start` itself stops what it started when it fails or is interrupted (SIGINT,
SIGTERM); `stop` returns once every process it stops has exited.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from urllib.parse import quote

import requests

from pipeline import io
from pipeline.config import ConfigError

STATE_FILE = "service.json"
PASSWORD_FILE = "password"
DRIVER = "postgresql+psycopg"  # SQLAlchemy's dialect for psycopg 3


@dataclass(frozen=True)
class Service:
    root: str
    host: str
    port: int
    db_port: int
    mlflow_pid: int  # 0 until mlflow server is started

    @property
    def tracking_uri(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def password(self) -> str:
        return (Path(self.root) / PASSWORD_FILE).read_text().strip()

    def database_url(self, name: str, with_password: bool = True) -> str:
        secret = f":{quote(self.password, safe='')}" if with_password else ""
        return f"{DRIVER}://postgres{secret}@127.0.0.1:{self.db_port}/{name}"


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
    for what, (address, number) in (("mlflow server", (host, port)), ("PostgreSQL", ("127.0.0.1", db_port))):
        if not _port_free(address, number):
            raise ConfigError(f"pipeline service: port {number} on {address} is in use ({what}); choose another")
    service = Service(str(root), host, port, db_port, 0)
    previous = {sig: signal.signal(sig, _interrupted) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _start(root, service, artifacts, timeout_s)
    except BaseException:  # a failure or a signal: stop what was started, leave no record
        if (root / STATE_FILE).is_file():
            stop(root)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class Interrupted(KeyboardInterrupt):
    """SIGTERM during `start`, raised like Ctrl-C so that start cleans up."""


def _interrupted(signum, frame):
    raise Interrupted(f"pipeline service: start interrupted by signal {signum}")


def _start(root: Path, service: Service, artifacts: str | None, timeout_s: float) -> Service:
    data, logs = root / "postgres", root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(logs, "postgres")
    if not (data / "PG_VERSION").is_file():
        _new_password(root / PASSWORD_FILE)
        _run(_as_postgres(["initdb", "-D", str(data), "--auth=scram-sha-256", f"--pwfile={root / PASSWORD_FILE}",
                           "-U", "postgres", "--no-sync"]), "initdb")
    elif not (root / PASSWORD_FILE).is_file():
        raise ConfigError(f"pipeline service: {data} has no password (an older service that trusted every local "
                          f"user); remove {data} to start afresh")
    _save(root, service)  # recorded before PostgreSQL starts: `stop` stops it whatever happens next
    _run(_as_postgres(["pg_ctl", "-D", str(data), "-l", str(logs / "postgres.log"), "-w", "-o",
                       f"-p {service.db_port} -k {root} -c listen_addresses=127.0.0.1", "start"]), "starting PostgreSQL")
    env = {**os.environ, "PGPASSWORD": service.password}  # off the command lines `ps` shows
    for name in ("mlflow", "optuna"):
        subprocess.run(_as_postgres(["createdb", "-h", "127.0.0.1", "-p", str(service.db_port), "-U", "postgres", name]),
                       capture_output=True, env=env)  # exists already on a restart: fine
    destination = artifacts or str(root / "artifacts")
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", service.database_url("mlflow", False),
               "--artifacts-destination", destination, "--host", service.host, "--port", str(service.port),
               "--workers", "2"]
    # A loaded machine (load average above its cores) starts the server more slowly: wait longer.
    patience = timeout_s * max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))
    for attempt in (1, 2):  # a server that died while starting (under load, say) gets a second try
        with open(logs / "mlflow.log", "ab") as log:
            mlflow = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True, env=env)
        service = replace(service, mlflow_pid=mlflow.pid)
        _save(root, service)
        if _serving(service, mlflow, patience):
            return service
        if mlflow.poll() is None or attempt == 2:
            break
    if mlflow.poll() is not None:
        raise ConfigError(f"pipeline service: mlflow server exited ({mlflow.returncode}) twice; {_tail(logs / 'mlflow.log')}")
    raise ConfigError(f"pipeline service: mlflow server did not answer within {patience:.0f} s; "
                      f"{_tail(logs / 'mlflow.log')}")


def _serving(service: Service, mlflow: subprocess.Popen, patience: float) -> bool:
    """Whether the server started answers its health check (False: it exited, or time ran out);
    an answer from a process outside its group is refused."""
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline and mlflow.poll() is None:
        try:
            answered = requests.get(service.tracking_uri + "/health", timeout=2).status_code == 200
        except requests.RequestException:
            answered = False
        if answered:
            if not _ours(service.port, mlflow.pid):
                raise ConfigError(f"pipeline service: port {service.port} is answered by a process this service did "
                                  "not start; choose another port")
            return True
        time.sleep(0.5)
    return False


def _new_password(path: Path) -> None:
    path.write_text(secrets.token_urlsafe(24) + "\n")
    path.chmod(0o600)
    if os.geteuid() == 0:
        shutil.chown(path, "postgres")  # initdb reads it as that user; root reads it anyway


def _save(root: Path, service: Service) -> None:
    io.write_text(root / STATE_FILE, json.dumps(asdict(service)))


def _tail(log: Path, lines: int = 5) -> str:
    text = log.read_text(errors="replace").strip().splitlines() if log.is_file() else []
    return f"see {log}" + (": " + " | ".join(text[-lines:]) if text else "")


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is no owner
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def _ours(port: int, pgid: int) -> bool:
    """Whether a process of group `pgid` holds the socket listening on `port` (Linux /proc; elsewhere
    the free-port check before starting is what there is)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    if not Path("/proc/net/tcp").exists():
        return True
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            if os.readlink(fd) in inodes and os.getpgid(int(fd.parts[2])) == pgid:
                return True
        except OSError:
            continue
    return False


def load(root: Path) -> Service:
    path = root.resolve() / STATE_FILE
    if not path.is_file():
        raise ConfigError(f"pipeline service: none started in {root.resolve()}")
    return Service(**json.loads(path.read_text()))


def stop(root: Path, service: Service | None = None, timeout_s: float = 30.0) -> None:
    """Stop the mlflow server's process group and PostgreSQL; return once both have exited. Without
    a record, stop a PostgreSQL that an interrupted start left running in DIR/postgres."""
    root = root.resolve()
    if service is None and not (root / STATE_FILE).is_file():
        if not (root / "postgres" / "postmaster.pid").is_file():
            raise ConfigError(f"pipeline service: none started in {root}")
    else:
        service = service or load(root)
        if service.mlflow_pid:
            _stop_group(service.mlflow_pid, timeout_s)
    _stop_postgres(root)
    (root / STATE_FILE).unlink(missing_ok=True)


def _stop_group(pgid: int, timeout_s: float) -> None:
    """SIGTERM the group, SIGKILL it after `timeout_s`, and wait until none of it runs."""
    for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.waitpid(pgid, os.WNOHANG)  # reap it when this process started it
            except ChildProcessError:
                pass
            if not _group_running(pgid):
                return
            time.sleep(0.1)
    raise ConfigError(f"pipeline service: mlflow server (process group {pgid}) did not exit after SIGKILL")


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


def _stop_postgres(root: Path, timeout_s: float = 60.0) -> None:
    """pg_ctl waits (-w) until the server has exited; nothing to do when none runs there. A server
    still starting up can miss the request (pg_ctl then fails at once, the server goes on): ask
    again until its pid file is gone or `timeout_s` has passed."""
    pid_file, deadline = root / "postgres" / "postmaster.pid", time.monotonic() + timeout_s
    while pid_file.is_file():
        done = subprocess.run(_as_postgres(["pg_ctl", "-D", str(root / "postgres"), "-m", "fast", "-w", "-t",
                                            str(round(timeout_s)), "stop"]), capture_output=True)
        if (done.returncode == 0 and not pid_file.is_file()) or time.monotonic() > deadline:
            return
        time.sleep(0.5)
