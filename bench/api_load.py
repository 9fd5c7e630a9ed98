"""Loopback load benchmark of the REST API (127.0.0.1 only; bounded in requests and time).

Starts the API in-process on 127.0.0.1 over a throw-away SQLite database with no worker
(``--database-url``/``--broker-url`` point it at Postgres/Redis instead), then measures:

1. status polling: ``GET /v1/repairs/{id}`` from N concurrent httpx async clients,
   reporting req/s and p50/p99 latency;
2. upload: ``POST /v1/repairs`` of a ~45 MB checkpoint (a vgg16_bn-sized safetensors,
   random weights) plus a small clean set — streaming parse, hashing, validation by
   actually loading the model, storage — reporting seconds and MB/s.

    OMP_NUM_THREADS=1 python bench/api_load.py --clients 16 --requests 2000 --seconds 30
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _checkpoint(root: Path, target_mb: float) -> tuple[Path, Path]:
    """A real loadable model of about ``target_mb`` (vgg16_bn CIFAR ≈ 59 MB, vgg11_bn ≈ 37 MB)."""
    import torch

    from onp_core.models import ARCHITECTURES, ModelManifest, build_model, save_model

    arch = min((a for a in ("vgg11_bn", "vgg13_bn", "vgg16_bn", "resnet18", "preact_resnet18") if a in ARCHITECTURES),
               key=lambda a: abs(sum(p.numel() for p in build_model(ModelManifest(
                   arch=a, num_classes=10, input_shape=(3, 32, 32))).parameters()) * 4 / 2**20 - target_mb))
    torch.manual_seed(0)
    model = build_model(ModelManifest(arch=arch, num_classes=10, input_shape=(3, 32, 32)))
    path = save_model(model, root / "model.safetensors")
    rng = np.random.default_rng(0)
    clean = root / "clean.npz"
    np.savez(clean, x=rng.integers(0, 256, (100, 3, 32, 32), dtype=np.uint8), y=np.arange(100) % 10)
    return path, clean


class _Server:
    """The API as a separate process (``uvicorn --factory``), so the load generator does not share its GIL."""

    def __init__(self, settings: object) -> None:
        import os
        import subprocess
        import sys

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("ONP_")}
        for name, value in settings.model_dump().items():  # type: ignore[attr-defined]
            if value is not None:
                env[f"ONP_{name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
        env.setdefault("OMP_NUM_THREADS", "1")
        self.proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "api.app:create_app",
                                      "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                                     env=env, cwd=Path(__file__).resolve().parents[1])
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{self.url}/healthz", timeout=1)
                return
            except httpx.HTTPError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("API server did not start") from None
                time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


async def _poll(url: str, key: str, job_id: str, clients: int, total: int, seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    remaining = [total]

    async def one_client() -> None:
        nonlocal errors
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as c:
            while remaining[0] > 0 and time.perf_counter() < deadline:
                remaining[0] -= 1
                t0 = time.perf_counter()
                r = await c.get(f"/v1/repairs/{job_id}")
                latencies.append(time.perf_counter() - t0)
                errors += r.status_code != 200

    t0 = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(clients)))
    wall = time.perf_counter() - t0
    return {"requests": len(latencies), "errors": errors, "seconds": wall, "req_per_s": len(latencies) / wall,
            "p50_ms": 1000 * statistics.median(latencies), "p99_ms": 1000 * _percentile(latencies, 0.99)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=2000, help="upper bound on polling requests")
    ap.add_argument("--seconds", type=float, default=30.0, help="upper bound on polling time")
    ap.add_argument("--upload-mb", type=float, default=45.0, help="approximate checkpoint size to upload")
    ap.add_argument("--uploads", type=int, default=3)
    ap.add_argument("--database-url", default=None, help="default: a temporary SQLite file")
    ap.add_argument("--broker-url", default=None, help="default: none (jobs stay queued; nothing runs)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()

    from store.db import database_for, upgrade
    from store.keys import create_key
    from store.settings import Settings

    with tempfile.TemporaryDirectory(prefix="onp-bench-") as tmp:
        root = Path(tmp)
        settings = Settings(data_dir=root / "var", database_url=args.database_url,
                            broker_url=args.broker_url or "memory://", embedded_worker=False,
                            max_model_bytes=1 << 30, broker_key_prefix="onpbench:")
        upgrade(settings.resolved_database_url)
        db = database_for(settings)
        with db.session() as s:
            key = create_key(s, "bench").key
        db.dispose()
        model, clean = _checkpoint(root, args.upload_mb)
        size_mb = model.stat().st_size / 2**20
        server = _Server(settings)
        try:
            uploads = []
            with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=300) as c:
                for _ in range(args.uploads):
                    files = {"model": (model.name, model.read_bytes()), "data": (clean.name, clean.read_bytes()),
                             "options": (None, json.dumps({"method": "clp"}))}
                    t0 = time.perf_counter()
                    r = c.post("/v1/repairs", files=files)
                    uploads.append(time.perf_counter() - t0)
                    r.raise_for_status()
                job_id = r.json()["id"]
            poll = asyncio.run(_poll(server.url, key, job_id, args.clients, args.requests, args.seconds))
        finally:
            server.stop()
    upload = {"checkpoint_mb": round(size_mb, 1), "seconds_median": statistics.median(uploads),
              "mb_per_s": size_mb / statistics.median(uploads), "runs": len(uploads)}
    print(f"status polling  {poll['requests']} requests from {args.clients} clients in {poll['seconds']:.1f}s: "
          f"{poll['req_per_s']:.0f} req/s, p50 {poll['p50_ms']:.1f} ms, p99 {poll['p99_ms']:.1f} ms, "
          f"{poll['errors']} errors")
    print(f"upload          {upload['checkpoint_mb']} MB checkpoint: {upload['seconds_median']:.2f}s median of "
          f"{upload['runs']} ({upload['mb_per_s']:.0f} MB/s incl. validation by loading the model)")
    if args.json:
        args.json.write_text(json.dumps({"poll": poll, "upload": upload}, indent=2))


if __name__ == "__main__":
    main()
