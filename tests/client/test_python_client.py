"""``onp_client`` against the real stack: the whole lifecycle, and errors carrying the server's detail."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from onp_client import AuthError, Client, Conflict, JobFailed, NotFound, ValidationFailed

pytestmark = pytest.mark.integration


@pytest.fixture()
def client(server: Any, keys: Any) -> Client:
    with Client(server.url, keys.alice) as c:
        yield c


def test_repair_wait_returns_metrics_and_model(client: Client, worker: Any, inputs: Any, tmp_path: Path) -> None:
    extra = {"triggered": inputs.triggered, "target": inputs.target} if inputs.triggered else {}
    repair = client.repair(inputs.model, inputs.clean, method="clp", options={"u": 3.0}, **extra)
    assert repair.job.status == "queued" and repair.job.method == "clp"
    seen: list[str] = []
    result = repair.wait(tmp_path / "out.safetensors", timeout=120, poll=0.2, on_update=lambda j: seen.append(j.status))
    assert result.job.succeeded and seen[-1] == "succeeded"
    assert 0.0 <= result.metrics.after.acc <= 1.0 and 0.0 <= result.metrics.before.acc <= 1.0
    assert result.metrics.num_pruned is not None and result.metrics.num_pruned >= 0
    assert (result.metrics.der is not None) == bool(inputs.triggered)
    assert result.model_path == tmp_path / "out.safetensors" and result.model_path.stat().st_size > 0

    from onp_core.models import load_model

    assert load_model(result.model_path).model is not None  # the download is a loadable model
    job_id = result.job.id
    assert client.get(job_id).status == "succeeded"
    assert job_id in {j.id for j in client.list(status="succeeded", limit=100).items}
    assert job_id in {j.id for j in client.iter_jobs(page_size=2)}
    report = client.report(job_id)
    assert report["job_id"] == job_id and report["num_pruned"] == result.metrics.num_pruned
    html = client.report_html(job_id)
    assert "<svg" in html and "Repair report" in html
    assert client.plot_png(job_id).startswith(b"\x89PNG")
    events, after = client.events(job_id)
    assert events[0].phase == "queued" and events[-1].phase == "succeeded" and after == events[-1].id
    again = client.download(job_id, tmp_path)
    assert again.name == f"repaired-{job_id}.safetensors"
    assert hashlib.sha256(again.read_bytes()).digest() == hashlib.sha256(result.model_path.read_bytes()).digest()


def test_default_output_is_next_to_the_model(client: Client, worker: Any, inputs: Any, tmp_path: Path) -> None:
    model = tmp_path / "net.safetensors"
    model.write_bytes(inputs.model.read_bytes())
    result = client.repair(model, inputs.clean, method="clp").wait(timeout=120, poll=0.2)
    assert result.model_path == tmp_path / "net.repaired.safetensors" and result.model_path.exists()


def test_state_dict_with_manifest_dict(client: Client, worker: Any, inputs: Any, tmp_path: Path) -> None:
    result = client.repair(inputs.model_pt, inputs.clean, method="clp", manifest=inputs.manifest) \
        .wait(tmp_path / "out.pt", timeout=120, poll=0.2)
    assert result.job.model_format == "pt" and result.model_path.exists()


def test_errors_carry_the_server_detail(server: Any, keys: Any, client: Client, inputs: Any, tmp_path: Path,
                                        worker: Any) -> None:
    with Client(server.url, "onp_bogus") as bad, pytest.raises(AuthError) as auth:
        bad.list()
    assert auth.value.status == 401 and "invalid or revoked" in auth.value.detail
    with pytest.raises(NotFound) as missing:
        client.get("00000000-0000-4000-8000-000000000000")
    assert missing.value.status == 404 and "no repair" in missing.value.detail
    garbage = tmp_path / "data.npz"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(ValidationFailed) as invalid:
        client.submit(inputs.model, garbage, method="clp")
    assert invalid.value.status == 422 and invalid.value.detail
    with pytest.raises(ValidationFailed, match="options"):
        client.submit(inputs.model, inputs.clean, method="clp", options={"no_such_option": 1})
    job = client.submit(inputs.model, inputs.clean, method="slow", options={"steps": 200, "delay": 0.05})
    with pytest.raises(Conflict):
        client.download(job)  # not finished yet: 409
    client.cancel(job)
    with pytest.raises(JobFailed) as failed:
        client.wait(job, timeout=60, poll=0.2)
    assert failed.value.job.status == "cancelled" and failed.value.exit_code == 1


def test_submit_is_idempotent_under_retries(client: Client, inputs: Any, worker: Any) -> None:
    """The Idempotency-Key the client sends makes a retried upload return the first job."""
    first = client.submit(inputs.model, inputs.clean, method="slow", options={"steps": 1, "delay": 0},
                          idempotency_key="client-test-1")
    again = client.submit(inputs.model, inputs.clean, method="slow", options={"steps": 1, "delay": 0},
                          idempotency_key="client-test-1")
    assert first.id == again.id
