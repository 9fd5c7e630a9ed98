"""A real repair end to end: HTTP API → Postgres → Redis → Celery worker process → download."""
from __future__ import annotations

import hashlib
import math

import httpx
import pytest

from conftest import Inputs, submit, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def finished(alice: httpx.Client, worker: object, inputs: Inputs) -> dict:
    options = {"method": "clp", "seed": 0, "device": "cpu", "options": {"u": 3.0}}
    extra = {"triggered": inputs.triggered, "target": inputs.target} if inputs.triggered else {}
    r = submit(alice, inputs.model, inputs.clean, options, **extra)
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["Location"] == f"/v1/repairs/{job['id']}" == job["links"]["self"]
    assert job["status"] == "queued" and job["method"] == "clp" and job["model_format"] == "safetensors"
    return wait_for(alice, job["id"], lambda j: j["status"] in ("succeeded", "failed", "cancelled"))


def test_job_succeeds_with_metrics(finished: dict, inputs: Inputs) -> None:
    assert finished["status"] == "succeeded", finished["error"]
    assert finished["progress"] == 1.0 and finished["error"] is None and finished["attempts"] == 1
    assert finished["created_at"] <= finished["started_at"] <= finished["finished_at"]
    m = finished["metrics"]
    for when in ("before", "after"):
        assert 0.0 <= m[when]["acc"] <= 1.0
        if inputs.triggered:
            assert 0.0 <= m[when]["asr"] <= 1.0 and 0.0 <= m[when]["ra"] <= 1.0
    assert m["num_pruned"] >= 0 and m["seconds"] > 0
    assert (m["der"] is not None) == bool(inputs.triggered)


def test_download_is_the_repaired_model(alice: httpx.Client, finished: dict, inputs: Inputs, tmp_path) -> None:
    """The download loads with load_model and scores what the worker recorded; on unseen CIFAR-10 test
    images the repair keeps the model close to its accuracy before."""
    from onp_core.data.uploads import read_clean_data
    from onp_core.metrics import accuracy, class_recall, erased_classes
    from onp_core.models import load_model

    r = alice.get(finished["links"]["model"])
    assert r.status_code == 200
    digest = hashlib.sha256(r.content).hexdigest()
    assert r.headers["X-Checksum-SHA256"] == digest and r.headers["ETag"] == f'"{digest}"'
    assert r.headers["content-disposition"].endswith('.safetensors"')
    assert alice.get(finished["links"]["model"], headers={"If-None-Match": f'"{digest}"'}).status_code == 304
    path = tmp_path / "repaired.safetensors"
    path.write_bytes(r.content)
    repaired = load_model(path).model
    original = load_model(inputs.model).model
    clean = read_clean_data(inputs.clean)
    m = finished["metrics"]
    assert math.isclose(accuracy(repaired, clean), m["after"]["acc"], abs_tol=1e-6)
    assert math.isclose(accuracy(original, clean), m["before"]["acc"], abs_tol=1e-6)
    before_eval, after_eval = accuracy(original, inputs.eval_set), accuracy(repaired, inputs.eval_set)
    assert 0.0 <= after_eval <= 1.0
    assert after_eval >= before_eval - 0.2, (before_eval, after_eval)
    # the report's per-class accuracies are the downloaded model's, and warn exactly about erased classes
    report = alice.get(finished["links"]["report"]).raise_for_status().json()
    recall = {"before": class_recall(original, clean, 10), "after": class_recall(repaired, clean, 10)}
    for when in ("before", "after"):
        assert len(report["class_recall"][when]) == len(recall[when]) == 10
        assert all(math.isclose(a, b, abs_tol=1e-6) for a, b in zip(report["class_recall"][when], recall[when]))
    assert len(m["warnings"]) == len(erased_classes(recall["before"], recall["after"]))


def test_report_plot_and_events(alice: httpx.Client, finished: dict) -> None:
    report = alice.get(finished["links"]["report"]).raise_for_status().json()
    assert report["job_id"] == finished["id"] and report["method"] == "clp"
    assert report["metrics"] == finished["metrics"]
    assert report["num_pruned"] == sum(len(v) for v in report["pruned"].values())
    plot = alice.get(finished["links"]["plot"])
    assert plot.status_code == 200 and plot.headers["content-type"] == "image/png"
    assert plot.content.startswith(b"\x89PNG")
    events = alice.get(finished["links"]["events"]).raise_for_status().json()
    phases = [e["phase"] for e in events["items"]]
    assert phases[0] == "queued" and phases[-1] == "succeeded"
    assert {"starting", "loading", "evaluating", "saving"} <= set(phases)
    newer = alice.get(finished["links"]["events"], params={"after": events["next_after"]}).json()
    assert newer["items"] == []


def test_list_and_pagination(alice: httpx.Client, finished: dict, inputs: Inputs) -> None:
    opts = {"method": "slow", "options": {"steps": 1, "delay": 0}}
    ids = {submit(alice, inputs.model, inputs.clean, opts).json()["id"] for _ in range(3)}
    seen, cursor = [], None
    while True:
        page = alice.get("/v1/repairs", params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
        assert len(page["items"]) <= 2
        seen += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) and ids | {finished["id"]} <= set(seen)
    created = [j["created_at"] for j in alice.get("/v1/repairs", params={"limit": 100}).json()["items"]]
    assert created == sorted(created, reverse=True)
    done = alice.get("/v1/repairs", params={"status": "succeeded", "limit": 100}).json()["items"]
    assert finished["id"] in {j["id"] for j in done} and all(j["status"] == "succeeded" for j in done)
    assert alice.get("/v1/repairs", params={"status": "bogus"}).status_code == 422
    assert alice.get("/v1/repairs", params={"cursor": "!!"}).status_code == 422


def test_idempotency_key(alice: httpx.Client, inputs: Inputs, worker: object) -> None:
    opts = {"method": "slow", "options": {"steps": 1, "delay": 0}}
    alice.headers["Idempotency-Key"] = "same-request-1"
    try:
        first = submit(alice, inputs.model, inputs.clean, opts)
        again = submit(alice, inputs.model, inputs.clean, opts)
    finally:
        del alice.headers["Idempotency-Key"]
    assert first.status_code == 202 and again.status_code == 200
    assert first.json()["id"] == again.json()["id"]


def test_other_user_sees_nothing(bob: httpx.Client, finished: dict) -> None:
    job_id = finished["id"]
    for path in ("", "/model", "/report", "/report/plot.png", "/events"):
        r = bob.get(f"/v1/repairs/{job_id}{path}")
        assert r.status_code == 404, (path, r.text)
    assert bob.post(f"/v1/repairs/{job_id}/cancel").status_code == 404
    assert job_id not in {j["id"] for j in bob.get("/v1/repairs", params={"limit": 100}).json()["items"]}


def test_auth_required(server: object, alice: httpx.Client) -> None:
    url = str(alice.base_url)
    assert httpx.get(f"{url}/v1/repairs").status_code == 401
    assert httpx.get(f"{url}/v1/repairs", headers={"Authorization": "Bearer onp_nope_nope"}).status_code == 401


@pytest.mark.slow
def test_onp_job_end_to_end_lowers_the_attack_success(alice: httpx.Client, worker: object, inputs: Inputs) -> None:
    """The default method, as a user runs it: submit, poll, read the worker's metrics.

    The upload is only 200 clean images (less than half the 500 the method is tuned for)
    and the test worker's job limit is 120 s on one thread, so the search budget is
    shortened (and only the patch family of triggers is searched: all three took the
    job to 87 s of the 120 in a CI run; the three are tested in tests/test_onp.py) and
    the bar is the weak one: the ASR on the user's triggered set halves.
    """
    options = {"method": "onp", "seed": 0, "device": "cpu",
               "options": {"iterations": 6, "episodes": 8, "synth_families": ["mask"]}}
    r = submit(alice, inputs.model, inputs.clean, options, triggered=inputs.triggered, target=inputs.target)
    assert r.status_code == 202, r.text
    job = wait_for(alice, r.json()["id"], lambda j: j["status"] in ("succeeded", "failed", "cancelled"), timeout=900)
    assert job["status"] == "succeeded", job["error"]
    m = job["metrics"]
    assert m["before"]["asr"] > 0.8
    assert m["after"]["asr"] < m["before"]["asr"] / 2, m
    assert m["after"]["acc"] >= m["before"]["acc"] - 0.05, m
