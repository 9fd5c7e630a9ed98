"""Helpers for fault injection: private Redis/Postgres that tests may kill, an API process, RSS sampling.

Everything listens on 127.0.0.1 only. Private servers run on free ports with their data in
throw-away folders, so killing or restarting them never touches anyone else's services.
"""
from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from onp_service_fixtures import REPO, settings_env

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(pred: Any, timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class PrivateRedis:
    """``redis-server`` without persistence on a free port: a restart loses every key, like a crash."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.root = root
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--daemonize", "no", "--dir", str(self.root), "--logfile", str(self.root / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        wait_until(up, 15, f"private redis on :{self.port}", 0.05)
        client.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self, down_for: float = 0.0) -> None:
        self.kill()
        time.sleep(down_for)
        self.start()

    def client(self) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1, socket_timeout=2)


def _pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql")
    return Path(found[-1]).parent


class PrivatePostgres:
    """A throw-away PostgreSQL cluster (initdb into a temp folder owned by ``postgres``) on a free port."""

    def __init__(self) -> None:
        self.bin = _pg_bin()
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="onp-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "pg.log"
        self._as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._as_pg:
            shutil.chown(self.root, "postgres", "postgres")
        os.chmod(self.root, 0o700)
        subprocess.run([*self._as_pg, str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                        "--no-sync", "-E", "UTF8"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        self.start()

    def _ctl(self, *args: str, check: bool = True) -> None:
        subprocess.run([*self._as_pg, str(self.bin / "pg_ctl"), "-D", str(self.data), *args], check=check,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)

    def start(self) -> None:
        opts = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=100")
        self._ctl("-o", opts, "-l", str(self.log), "-w", "-t", "30", "start")

    def stop(self, mode: str = "immediate") -> None:
        """``immediate`` is a crash: backends are killed, no checkpoint (recovery on the next start)."""
        self._ctl("-m", mode, "-w", "-t", "30", "stop", check=False)

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


class ApiProcess:
    """The API as its own uvicorn process (``tests/reliability/api_proc.py``), so it can be SIGKILLed or measured."""

    def __init__(self, settings: Any, log: Path, extra_env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = settings_env(settings)
        env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(HERE)])
        env.update(extra_env or {})
        self._out = open(log, "wb")
        self.log = log
        self.proc = subprocess.Popen([sys.executable, str(HERE / "api_proc.py"), str(self.port)], cwd=REPO, env=env,
                                     stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"API process did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss(self) -> int:
        return rss_bytes(self.proc.pid)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        self._out.close()


def rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def peak_rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def reset_peak_rss(pid: int | str = "self") -> bool:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5); False where not permitted."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class RssSampler(threading.Thread):
    """Samples a process's RSS every ``period`` seconds until stopped."""

    def __init__(self, pid: int | str, period: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.pid, self.period = pid, period
        self.samples: list[int] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self.samples.append(rss_bytes(self.pid))
            except (OSError, RuntimeError):
                return
            self._stop_event.wait(self.period)

    def stop(self) -> list[int]:
        self._stop_event.set()
        self.join(5)
        return self.samples


class SilentServer:
    """Accepts TCP connections on 127.0.0.1 and never answers: a hung database or broker."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self._stop = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
                self.conns.append(conn)
            except OSError:
                continue

    def close(self) -> None:
        self._stop = True
        self.thread.join(2)
        for c in self.conns:
            c.close()
        self.sock.close()


def tmpfs(path: Path, size: str) -> bool:
    """Mount a size-limited tmpfs at ``path`` (a real 'disk' that fills up); False where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0777", "tmpfs", str(path)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return r.returncode == 0


def umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def fill(path: Path, leave: int = 0) -> Path:
    """Fill the filesystem of ``path`` until at most ``leave`` bytes remain free."""
    filler = path / f"filler-{time.monotonic_ns()}"
    with open(filler, "wb") as f:
        while True:
            free = shutil.disk_usage(path).free
            if free <= leave:
                break
            try:
                f.write(b"\0" * min(1 << 20, free - leave))
                f.flush()
            except OSError:
                break
    return filler


def create_database(admin_url: str) -> tuple[str, Any]:
    """A fresh database (migrated to head) on the shared server; returns (url, drop)."""
    import secrets

    import psycopg

    from store.db import upgrade

    name = f"onp_test_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    url = f"{base}/{name}"
    upgrade(url)

    def drop() -> None:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return url, drop


def make_key(settings: Any, user: str) -> str:
    from store.db import database_for
    from store.keys import create_key

    db = database_for(settings)
    try:
        with db.session() as s:
            return create_key(s, user, "reliability").key
    finally:
        db.dispose()


def job_row(settings: Any, job_id: Any) -> Any:
    import uuid

    from store.db import database_for
    from store.models import Job

    db = database_for(settings)
    try:
        with db.session() as s:
            return s.get(Job, uuid.UUID(str(job_id)))
    finally:
        db.dispose()


def client(url: str, key: str, timeout: float = 30) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=timeout)
