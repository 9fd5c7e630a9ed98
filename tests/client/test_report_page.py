"""The HTML report: figures for each method's report shape, self-contained output, and its API route."""
from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from worker.report import accuracy_points, layer_rows, report_figures, trace_groups
from worker.report_html import render_html

BASE: dict[str, Any] = {
    "job_id": "j", "model_format": "safetensors", "num_pruned": 3, "seconds": 1.5,
    "manifest": {"arch": "small_cnn", "num_classes": 10, "input_shape": [3, 32, 32]},
    "metrics": {"before": {"acc": 0.9, "asr": 0.95, "ra": 0.04}, "after": {"acc": 0.88, "asr": 0.05, "ra": 0.8},
                "der": 0.94, "num_pruned": 3, "seconds": 1.5},
    "heldout_clean_acc": {"before": 0.9, "after": 0.87}, "pruned": {"conv1": [1, 5], "conv2": [0]},
}
ONP = {**BASE, "method": "onp",
       "trace": [{"step": i, "reward_mean": -1 + 0.1 * i, "reward_best": -0.5, "mean_pruned": 4 - i}
                 for i in range(1, 6)],
       "details": {"neurons_total": 48, "layers": [{"name": "conv1", "size": 16, "pruned": 2},
                                                   {"name": "conv2", "size": 32, "pruned": 1}],
                   "candidates": [{"reward": 0.1, "acc": 0.86, "backdoor_score": 0.1, "fraction": 0.0625},
                                  {"reward": 0.0, "acc": 0.9, "backdoor_score": 0.9, "fraction": 0.0}]}}
CLP = {**BASE, "method": "clp",
       "trace": [{"phase": "lipschitz", "layer": "conv1", "mean": 0.3, "std": 0.1, "max": 0.9, "num_pruned": 2},
                 {"phase": "lipschitz", "layer": "conv2", "mean": 0.2, "std": 0.1, "max": 0.5, "num_pruned": 1},
                 {"phase": "prune", "num_pruned": 3, "acc": 0.87}],
       "details": {"u": 3.0, "uclc": {"conv1": [0.1] * 16, "conv2": [0.2] * 32}}}
FP = {**BASE, "method": "fp", "pruned": {"fc": [0, 1, 2]},
      "trace": [{"phase": "prune", "num_pruned": k, "acc": 0.9 - 0.01 * k} for k in range(0, 5)]
      + [{"phase": "finetune", "epoch": e, "loss": 1 / e, "train_acc": 0.5 + 0.1 * e, "acc": 0.85} for e in (1, 2)],
      "details": {"layer": "fc", "group": ["fc"], "layer_size": 64}}
RNP = {**BASE, "method": "rnp",
       "trace": [{"phase": "unlearn", "epoch": e, "loss": 2 + e, "train_acc": 0.5} for e in (1, 2, 3)]
       + [{"phase": "recover", "epoch": e, "loss": 1 / e, "train_acc": 0.7, "below_threshold": e} for e in (1, 2)],
       "details": {"mask_values": {"conv1": [1.0] * 16, "conv2": [0.1] * 32}}}


@pytest.mark.parametrize("report", [ONP, CLP, FP, RNP], ids=["onp", "clp", "fp", "rnp"])
def test_every_method_gets_all_four_figures(report: dict) -> None:
    assert set(report_figures(report)) == {"metrics", "trace", "accuracy", "layers"}


def test_layer_sizes_and_curves_come_from_the_details() -> None:
    assert [(r["name"], r["size"], r["pruned"]) for r in layer_rows(ONP)] == [("conv1", 16, [1, 5]), ("conv2", 32, [0])]
    assert [(r["name"], r["size"]) for r in layer_rows(FP)] == [("fc", 64)]
    unknown = layer_rows({"pruned": {"x": [7]}})
    assert unknown[0]["size"] is None
    assert accuracy_points(ONP)["candidates"] == [(0.0, 0.9), (3.0, 0.86)]
    assert accuracy_points(ONP)["chosen"] == [(3.0, 0.87)]
    assert len(accuracy_points(FP)["sweep"]) == 5
    assert [g[0] for g in trace_groups(RNP["trace"])] == ["unlearn", "recover"]


def test_page_is_self_contained_and_escaped() -> None:
    hostile = {**ONP, "pruned": {'<script>alert(1)</script>': [0]},
               "inputs": {"model_sha256": '"><img src=http://evil/x>'}}
    html = render_html(hostile)
    assert html.count("<svg") == 4
    assert "<script" not in html.lower().replace("&lt;script&gt;", "")
    assert not re.search(r"""<[^>]*\s(src|href)\s*=\s*["']?(https?:)?//""", html), "external reference in the report"
    assert not re.search(r"url\(\s*['\"]?(?!#)", html) and "@import" not in html  # only in-page url(#id)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_sparse_report_still_renders() -> None:
    html = render_html({"job_id": "x", "method": "clp"})
    assert "Repair report" in html and "<svg" not in html and "no layer information" in html


@pytest.mark.integration
def test_report_html_route(alice: httpx.Client, bob: httpx.Client, worker: Any, inputs: Any) -> None:
    from onp_client import Client

    with Client(str(alice.base_url), alice.headers["Authorization"].split()[1]) as c:
        job = c.wait(c.submit(inputs.model, inputs.clean, method="clp"), timeout=120, poll=0.2)
        pending = c.submit(inputs.model, inputs.clean, method="slow", options={"steps": 100, "delay": 0.05})
    url = f"/v1/repairs/{job.id}/report.html"
    r = alice.get(url)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert r.headers["content-disposition"].startswith("inline")
    assert alice.get(url, params={"download": "true"}).headers["content-disposition"].startswith("attachment")
    assert bob.get(url).status_code == 404
    assert alice.get(f"/v1/repairs/{pending.id}/report.html").status_code == 409
    alice.post(f"/v1/repairs/{pending.id}/cancel")
    assert httpx.get(f"{alice.base_url}{url}").status_code == 401
    assert "/v1/repairs/{job_id}/report.html" in alice.get("/openapi.json").json()["paths"]
