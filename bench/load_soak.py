"""Loopback soak of the REST API while jobs run: throughput, latency and API memory over minutes.

Starts, on 127.0.0.1 only: the API as its own uvicorn process and one real Celery worker, against a
throw-away Postgres database and a random Redis key prefix (the shared servers are not restarted or
flushed). Then N concurrent async clients (each with its own API key of one user, so per-key rate
limits apply as in production) poll ``GET /v1/repairs/{id}`` and list ``GET /v1/repairs?limit=20``
while the worker runs jobs and new jobs keep arriving. Bounded in clients, requests and time.

Reported: requests/s, p50/p99 latency (overall and per window), errors, and the API process RSS
sampled every second (start after warm-up, end, max, slope over the second half): flat memory means
no per-request leak.

The jobs use the test-only ``slow`` method (tests/service/slow_defense.py: steps of sleep), so the
worker holds jobs ``running`` for the whole soak without competing for the CPU with the API on a
small machine.

    OMP_NUM_THREADS=1 python bench/load_soak.py --clients 32 --seconds 180
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
SERVICE_TESTS = REPO / "tests" / "service"
MiB = 1 << 20


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _env(settings: object) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONP_")}
    for name, value in settings.model_dump().items():  # type: ignore[attr-defined]
        if value is not None:
            env[f"ONP_{name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(SERVICE_TESTS)])
    return env


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Proc:
    def __init__(self, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.log = open(log, "wb")
        self.proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def _inputs(root: Path) -> tuple[Path, Path]:
    import torch

    from onp_core.models import ModelManifest, build_model, save_model

    torch.manual_seed(0)
    model = save_model(build_model(ModelManifest(arch="small_cnn", num_classes=10, input_shape=(3, 32, 32))),
                       root / "model.safetensors")
    rng = np.random.default_rng(0)
    clean = root / "clean.npz"
    np.savez(clean, x=rng.integers(0, 256, (50, 3, 32, 32), dtype=np.uint8), y=np.arange(50) % 10)
    return model, clean


def _submit(c: httpx.Client, model: Path, clean: Path, steps: int, delay: float) -> str:
    r = c.post("/v1/repairs", files={
        "model": (model.name, model.read_bytes()), "data": (clean.name, clean.read_bytes()),
        "options": (None, json.dumps({"method": "slow", "options": {"steps": steps, "delay": delay}}))})
    r.raise_for_status()
    return r.json()["id"]


async def _soak(url: str, keys: list[str], job_ids: list[str], seconds: float, max_requests: int,
                window: float) -> dict:
    records: list[tuple[float, float, int]] = []  # (t since start, latency, status)
    t_start = time.perf_counter()
    deadline = t_start + seconds
    budget = [max_requests]

    async def one(i: int, key: str) -> None:
        limits = httpx.Limits(max_connections=1)
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30,
                                     limits=limits) as c:
            n = 0
            while time.perf_counter() < deadline and budget[0] > 0:
                budget[0] -= 1
                n += 1
                path = "/v1/repairs?limit=20" if n % 4 == 0 else f"/v1/repairs/{job_ids[(i + n) % len(job_ids)]}"
                t0 = time.perf_counter()
                try:
                    status = (await c.get(path)).status_code
                except httpx.HTTPError:
                    status = 0
                records.append((t0 - t_start, time.perf_counter() - t0, status))

    await asyncio.gather(*(one(i, k) for i, k in enumerate(keys)))
    wall = time.perf_counter() - t_start
    lat = [r[1] for r in records]
    windows = []
    for w0 in np.arange(0, wall, window):
        chunk = [r for r in records if w0 <= r[0] < w0 + window]
        if chunk:
            wl = [r[1] for r in chunk]
            windows.append({"from_s": round(float(w0)), "req_per_s": round(len(chunk) / window, 1),
                            "p50_ms": round(1000 * statistics.median(wl), 1), "p99_ms": round(1000 * _pct(wl, .99), 1)})
    codes: dict[str, int] = {}
    for r in records:
        codes[str(r[2])] = codes.get(str(r[2]), 0) + 1
    return {"requests": len(records), "seconds": round(wall, 1), "req_per_s": round(len(records) / wall, 1),
            "p50_ms": round(1000 * statistics.median(lat), 1), "p99_ms": round(1000 * _pct(lat, 0.99), 1),
            "status_codes": codes, "errors": sum(v for k, v in codes.items() if k != "200"), "windows": windows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=180.0, help="soak duration (bounded)")
    ap.add_argument("--max-requests", type=int, default=500_000, help="upper bound on requests")
    ap.add_argument("--jobs", type=int, default=6, help="jobs submitted before the soak")
    ap.add_argument("--submit-every", type=float, default=10.0, help="seconds between new jobs during the soak")
    ap.add_argument("--window", type=float, default=30.0, help="seconds per reporting window")
    ap.add_argument("--pg-admin", default=os.environ.get("ONP_TEST_PG_ADMIN",
                                                         "postgresql://postgres@127.0.0.1:5432/postgres"))
    ap.add_argument("--redis", default=os.environ.get("ONP_TEST_REDIS", "redis://127.0.0.1:6379/0"))
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    from urllib.parse import urlsplit

    for url in (args.pg_admin, args.redis):
        if urlsplit(url).hostname not in ("127.0.0.1", "localhost", "::1"):
            sys.exit(f"refusing to run against a non-loopback service: {url}")

    import psycopg

    from store.db import database_for, upgrade
    from store.keys import create_key
    from store.settings import Settings

    dbname = f"onp_soak_{secrets.token_hex(4)}"
    with psycopg.connect(args.pg_admin, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{dbname}"')
    db_url = args.pg_admin.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1) + f"/{dbname}"
    procs: list[_Proc] = []
    try:
        with tempfile.TemporaryDirectory(prefix="onp-soak-") as tmp:
            root = Path(tmp)
            settings = Settings(data_dir=root, database_url=db_url, broker_url=args.redis,
                                broker_key_prefix=f"onpsoak-{secrets.token_hex(3)}:", embedded_worker=False,
                                auto_migrate=False, maintenance_seconds=5, torch_threads=1)
            upgrade(db_url)
            db = database_for(settings)
            with db.session() as s:
                keys = [create_key(s, "soak", f"client-{i}").key for i in range(args.clients)]
            db.dispose()
            model, clean = _inputs(root)
            env = _env(settings)
            port = _free_port()
            serve = ("import slow_defense, uvicorn; from api.app import create_app; "  # registers method 'slow'
                     f"uvicorn.run(create_app(), host='127.0.0.1', port={port}, log_level='warning')")
            api = _Proc([sys.executable, "-c", serve], env, root / "api.log")
            procs.append(api)
            worker = _Proc([sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", "cpu", "-P",
                            "prefork", "-c", "1", "-n", "soak@%h", "--without-gossip", "--without-mingle",
                            "--without-heartbeat", "-I", "slow_defense", "--loglevel", "WARNING"], env,
                           root / "worker.log")
            procs.append(worker)
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or api.proc.poll() is not None:
                    raise RuntimeError(f"API did not start: {(root / 'api.log').read_text()[-2000:]}")
                time.sleep(0.2)
            job_steps = max(10, int(args.seconds / max(1, args.jobs) * 2))  # ~ 0.5 s per step
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {keys[0]}"}, timeout=60) as c:
                job_ids = [_submit(c, model, clean, job_steps, 0.5) for _ in range(args.jobs)]
                # warm-up (imports, pools), then the measured soak
                asyncio.run(_soak(url, keys, job_ids, 5.0, 2000, 5.0))
            rss: list[tuple[float, int]] = []
            stop = threading.Event()
            t0 = time.monotonic()

            def sample() -> None:
                while not stop.wait(1.0):
                    rss.append((time.monotonic() - t0, _rss(api.proc.pid)))

            def keep_submitting() -> None:
                with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {keys[0]}"}, timeout=60) as c:
                    while not stop.wait(args.submit_every):
                        job_ids.append(_submit(c, model, clean, 4, 0.25))

            rss.append((0.0, _rss(api.proc.pid)))
            threads = [threading.Thread(target=sample, daemon=True), threading.Thread(target=keep_submitting,
                                                                                      daemon=True)]
            for t in threads:
                t.start()
            result = asyncio.run(_soak(url, keys, job_ids, args.seconds, args.max_requests, args.window))
            stop.set()
            for t in threads:
                t.join(30)
            rss.append((time.monotonic() - t0, _rss(api.proc.pid)))
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {keys[0]}"}, timeout=60) as c:
                statuses: dict[str, int] = {}
                for jid in job_ids:
                    st = c.get(f"/v1/repairs/{jid}").json()["status"]
                    statuses[st] = statuses.get(st, 0) + 1
    finally:
        for p in procs:
            p.stop()
        with psycopg.connect(args.pg_admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')

    half = [(t, r) for t, r in rss if t >= rss[-1][0] / 2]
    slope = float(np.polyfit([t for t, _ in half], [r for _, r in half], 1)[0]) * 60 / MiB if len(half) > 2 else 0.0
    memory = {"rss_start_mib": round(rss[0][1] / MiB, 1), "rss_end_mib": round(rss[-1][1] / MiB, 1),
              "rss_max_mib": round(max(r for _, r in rss) / MiB, 1), "slope_second_half_mib_per_min": round(slope, 2),
              "samples": len(rss),
              "series_mib": [[round(t), round(r / MiB, 1)] for t, r in rss[:: max(1, len(rss) // 30)]]}
    out = {"clients": args.clients, "soak": result, "api_memory": memory, "jobs": statuses}
    print(f"soak      {result['requests']} requests from {args.clients} clients in {result['seconds']} s: "
          f"{result['req_per_s']} req/s, p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms, "
          f"status codes {result['status_codes']}")
    print("windows   " + "\n          ".join(f"{w['from_s']:>4}s  {w['req_per_s']:>7} req/s  p50 {w['p50_ms']:>6} ms  "
                                            f"p99 {w['p99_ms']:>7} ms" for w in result["windows"]))
    print(f"API RSS   start {memory['rss_start_mib']} MiB, end {memory['rss_end_mib']} MiB, "
          f"max {memory['rss_max_mib']} MiB, slope over the second half {memory['slope_second_half_mib_per_min']} "
          f"MiB/min ({memory['samples']} samples)")
    print("RSS (s, MiB) " + " ".join(f"{t}:{r}" for t, r in memory["series_mib"]))
    print(f"jobs      {statuses}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
