"""The ``onp`` client commands against a real server and worker: output, JSON mode and exit codes."""
from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from onp_cli.main import app

pytestmark = pytest.mark.integration

CLP = ["--method", "clp", "--options", '{"u": 3.0}']
SLOW = ["--method", "slow", "--options", '{"steps": 200, "delay": 0.05}']


def onp(*args: str, server: Any = None, key: str | None = None) -> Any:
    """Run ``onp ARGS`` in-process (typer's runner); flags for server and key come after the command."""
    extra = [*(["--server", server.url] if server else []), *(["--key", key] if key else [])]
    result = CliRunner().invoke(app, [*args, *extra], catch_exceptions=False)
    return result


def attack_args(inputs: Any) -> list[str]:
    return ["--triggered", str(inputs.triggered), "--target", str(inputs.target)] if inputs.triggered else []


@pytest.fixture(scope="module")
def finished(server: Any, keys: Any, worker: Any, inputs: Any, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``onp submit --wait -o FILE`` of a clp repair: its output, exit code and the saved model."""
    out = tmp_path_factory.mktemp("cli") / "repaired.safetensors"
    r = onp("submit", str(inputs.model), "--data", str(inputs.clean), *CLP, *attack_args(inputs), "--wait",
            "--poll", "0.2", "-o", str(out), server=server, key=keys.alice)
    job_id = next(line.split()[1] for line in r.output.splitlines() if line.startswith("submitted "))
    return {"result": r, "id": job_id, "path": out}


def test_submit_wait_shows_progress_and_metrics(finished: dict, inputs: Any) -> None:
    r = finished["result"]
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    progress = [line for line in lines if line.startswith("[") and "%]" in line]
    assert progress and "succeeded" in progress[-1] and progress[-1].startswith("[100%]"), r.output
    assert any("running" in line or "queued" in line for line in progress), r.output
    assert "clp repair" in r.output and "before" in r.output and "after" in r.output
    for col in ("ACC", "ASR", "RA", "DER", "neurons pruned"):
        assert col in r.output, (col, r.output)
    table = [line for line in lines if line.strip().startswith(("│ before", "│ after", "before", "after"))]
    assert len(table) == 2 and all("%" in line for line in table), r.output
    assert "sha256 verified" in r.output and finished["path"].stat().st_size > 0


def test_status_and_list_json_parse(finished: dict, server: Any, keys: Any, alice: httpx.Client) -> None:
    r = onp("status", finished["id"], "--json", server=server, key=keys.alice)
    assert r.exit_code == 0
    job = json.loads(r.stdout)
    assert job["id"] == finished["id"] and job["status"] == "succeeded" and job["method"] == "clp"
    assert job == alice.get(f"/v1/repairs/{finished['id']}").json()
    r = onp("list", "--status", "succeeded", "--limit", "100", "--json", server=server, key=keys.alice)
    page = json.loads(r.stdout)
    assert finished["id"] in {j["id"] for j in page["items"]} and "next_cursor" in page
    assert {j["status"] for j in page["items"]} == {"succeeded"}
    human = onp("list", server=server, key=keys.alice)
    assert human.exit_code == 0 and finished["id"] in human.output and "succeeded" in human.output
    shown = onp("status", finished["id"], server=server, key=keys.alice)
    assert shown.exit_code == 0 and "succeeded" in shown.output and "ASR" in shown.output


def test_download_verifies_checksum(finished: dict, server: Any, keys: Any, alice: httpx.Client,
                                    tmp_path: Path) -> None:
    r = onp("download", finished["id"], "-o", str(tmp_path), "--json", server=server, key=keys.alice)
    assert r.exit_code == 0, r.output
    path = Path(json.loads(r.stdout)["path"])
    assert path.parent == tmp_path and path.name == f"repaired-{finished['id']}.safetensors"
    served = alice.get(f"/v1/repairs/{finished['id']}/model").headers["X-Checksum-SHA256"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == served
    assert path.read_bytes() == finished["path"].read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".onp-download-")]


def test_report_json_and_html(finished: dict, server: Any, keys: Any, tmp_path: Path) -> None:
    r = onp("report", finished["id"], server=server, key=keys.alice)
    assert r.exit_code == 0 and json.loads(r.stdout)["job_id"] == finished["id"]
    r = onp("report", finished["id"], "--html", "-o", str(tmp_path / "r.html"), server=server, key=keys.alice)
    html = (tmp_path / "r.html").read_text()
    assert r.exit_code == 0 and html.startswith("<!doctype html>") and "<svg" in html


def test_submit_json_then_wait_json(server: Any, keys: Any, worker: Any, inputs: Any) -> None:
    r = onp("submit", str(inputs.model), "--data", str(inputs.clean), *CLP, "--json", server=server, key=keys.alice)
    assert r.exit_code == 0, r.output
    job = json.loads(r.stdout)
    assert job["status"] == "queued" and job["method"] == "clp"
    r = onp("wait", job["id"], "--json", "--poll", "0.2", server=server, key=keys.alice)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["status"] == "succeeded"


def test_cancel_then_wait_exits_1(server: Any, keys: Any, worker: Any, inputs: Any) -> None:
    r = onp("submit", str(inputs.model), "--data", str(inputs.clean), *SLOW, "--json", server=server, key=keys.alice)
    job_id = json.loads(r.stdout)["id"]
    r = onp("cancel", job_id, server=server, key=keys.alice)
    assert r.exit_code == 0 and ("cancelled" in r.output or "cancel requested" in r.output), r.output
    r = onp("wait", job_id, "--poll", "0.2", server=server, key=keys.alice)
    assert r.exit_code == 1 and "cancelled" in r.output
    again = onp("cancel", job_id, server=server, key=keys.alice)
    assert again.exit_code in (0, 1)  # already cancelled: 200 (0); the API answers 409 only for succeeded/failed


def test_exit_codes(finished: dict, server: Any, keys: Any, inputs: Any, tmp_path: Path) -> None:
    unknown = "00000000-0000-4000-8000-000000000000"
    bad_key = onp("status", finished["id"], server=server, key="onp_not_a_real_key")
    assert bad_key.exit_code == 3 and "invalid or revoked API key" in bad_key.output
    assert onp("status", unknown, server=server, key=keys.alice).exit_code == 4
    other_user = onp("status", finished["id"], server=server, key=keys.bob)
    assert other_user.exit_code == 4 and "no repair" in other_user.output
    assert onp("status", "not-a-uuid", server=server, key=keys.alice).exit_code == 2
    assert onp("cancel", finished["id"], server=server, key=keys.alice).exit_code == 1  # succeeded: 409
    assert onp("submit", str(inputs.model), server=server, key=keys.alice).exit_code == 2  # --data missing
    assert onp("submit", str(inputs.model), "--data", str(inputs.clean), "--options", "{nope",
               server=server, key=keys.alice).exit_code == 2
    garbage = tmp_path / "clean.npz"
    garbage.write_bytes(b"not an npz")
    rejected = onp("submit", str(inputs.model), "--data", str(garbage), *CLP, server=server, key=keys.alice)
    assert rejected.exit_code == 2 and "422" in rejected.output, rejected.output
    assert onp("list", server=server).exit_code == 3  # no key anywhere
    offline = CliRunner().invoke(app, ["list", "--server", "http://127.0.0.1:9", "--key", keys.alice])
    assert offline.exit_code == 5 and "cannot reach" in offline.output


def test_login_writes_private_config(server: Any, keys: Any, finished: dict, isolated_config: Path) -> None:
    denied = onp("login", "--key", "onp_wrong", "--server", server.url)
    assert denied.exit_code == 3 and not isolated_config.exists()
    r = onp("login", "--key", keys.alice, "--server", server.url)
    assert r.exit_code == 0, r.output
    assert stat.S_IMODE(isolated_config.stat().st_mode) == 0o600
    listed = onp("list", "--json")  # server and key from the config file
    assert listed.exit_code == 0 and finished["id"] in listed.output
    assert onp("logout").exit_code == 0
    assert onp("list").exit_code == 3


def test_env_credentials(server: Any, keys: Any, finished: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONP_SERVER", server.url)
    monkeypatch.setenv("ONP_API_KEY", keys.alice)
    assert onp("status", finished["id"]).exit_code == 0


def test_installed_entry_point_exit_code(server: Any, finished: dict, isolated_config: Path) -> None:
    """The real ``onp`` executable (not the in-process runner) exits 3 with the server's reason on stderr."""
    env = {**os.environ, "ONP_CONFIG": str(isolated_config), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "onp_cli.main", "status", finished["id"], "--server", server.url,
                           "--key", "onp_bogus"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert "invalid or revoked API key" in proc.stderr and proc.stdout == ""

