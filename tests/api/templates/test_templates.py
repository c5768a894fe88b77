"""Run templates over REST: versions, triggers with CI context and Idempotency-Key (also under
real concurrency), and what happens when a templated run ends: its gate, auto-promotion,
manual promotion and the champion history."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func
from sqlmodel import select

from api.config import Settings
from api.db import session_scope
from api.notify.models import WebhookDelivery, webhook_tag
from api.runs.models import Run
from api.runs.states import RunStatus
from api.templates.models import TemplateVersion
from tests.api.factories import insert_runs
from tests.api.templating import SPEC, finish, make_template, trigger
from tests.conftest import LiveServer

# ---- CRUD and versions -----------------------------------------------------------------------


def test_create_get_and_list(client: TestClient) -> None:
    body = make_template(client, gates={"min_accuracy": 0.8}, description="nightly pets")
    assert body["version"] == 1 and body["gates"]["min_accuracy"] == 0.8
    # Stored with every default filled in: a later change of a default changes nothing.
    assert body["spec"]["lora_r"] == 16 and body["spec"]["gpu_type"] == "nvidia-l4"
    assert client.get("/api/v1/templates/pets").json() == body
    assert [t["name"] for t in client.get("/api/v1/templates").json()] == ["pets"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "Pets!", "spec": SPEC}, "body.name"),
        ({"name": "pets", "spec": {**SPEC, "lora_r": 0}}, "body.spec.lora_r"),
        ({"name": "pets", "spec": SPEC, "gates": {"min_accuracy": 2}}, "body.gates.min_accuracy"),
        ({"name": "pets", "spec": SPEC, "gates": {"max_acc": 1}}, "body.gates.max_acc"),
        ({"name": "pets", "spec": SPEC, "webhooks": [{"url": "ftp://x"}]}, "body.webhooks.0.url"),
        (
            {"name": "pets", "spec": SPEC, "webhooks": [{"url": "http://x"}]},
            "body.webhooks.0.secret",
        ),
        ({"name": "pets", "spec": SPEC, "surprise": 1}, "body.surprise"),
    ],
)
def test_invalid_templates_are_refused_with_the_field(
    client: TestClient, body: dict[str, Any], field: str
) -> None:
    r = client.post("/api/v1/templates", json=body)
    assert r.status_code == 422, r.text
    assert field in [e["field"] for e in r.json()["errors"]], r.json()


def test_duplicate_name_is_409(client: TestClient) -> None:
    make_template(client)
    r = client.post("/api/v1/templates", json={"name": "pets", "spec": SPEC})
    assert r.status_code == 409 and "PUT /api/v1/templates/pets" in r.json()["detail"]


def test_put_makes_a_new_version_and_an_identical_put_makes_none(client: TestClient) -> None:
    make_template(client)
    edited = {"spec": {**SPEC, "train_size": 2500}, "gates": {"min_macro_f1": 0.5}}
    r = client.put("/api/v1/templates/pets", json=edited)
    assert r.status_code == 200 and r.json()["version"] == 2
    assert r.json()["spec"]["train_size"] == 2500
    again = client.put("/api/v1/templates/pets", json=edited)
    assert again.json()["version"] == 2 and again.headers["x-tuneplane-unchanged"] == "true"
    versions = client.get("/api/v1/templates/pets/versions").json()
    assert [v["version"] for v in versions] == [2, 1]
    assert versions[1]["spec"]["train_size"] == 100
    assert client.put("/api/v1/templates/nope", json=edited).status_code == 404


def test_delete_hides_and_a_recreated_name_continues_its_versions(client: TestClient) -> None:
    make_template(client)
    client.put("/api/v1/templates/pets", json={"spec": {**SPEC, "train_size": 7}})
    assert client.delete("/api/v1/templates/pets").status_code == 204
    assert client.get("/api/v1/templates/pets").status_code == 404
    assert client.get("/api/v1/templates").json() == []
    assert client.post("/api/v1/templates/pets/runs", json={}).status_code == 404
    again = make_template(client)
    assert again["version"] == 3  # (pets, 1) and (pets, 2) keep meaning what they meant


def test_webhook_secrets_and_url_paths_are_never_returned(client: TestClient) -> None:
    """A Slack-style URL's path is its credential: the api shows scheme and host only, as the
    deliveries list and the notifier's log do (api/notify/models.py `display_url`)."""
    secret = "s3cret-" + uuid.uuid4().hex
    path = f"/services/T0/B0/{uuid.uuid4().hex}"
    url = f"https://hooks.slack.example{path}"
    body = make_template(client, webhooks=[{"url": url, "secret": secret}])
    shown = f"https://hooks.slack.example/…#k={webhook_tag(url)}"
    assert body["webhooks"] == [{"url": shown, "has_own_secret": True}]
    for p in ["/api/v1/templates/pets", "/api/v1/templates", "/api/v1/templates/pets/versions"]:
        text = client.get(p).text
        assert secret not in text and path not in text, p


def _stored_webhooks(engine: Engine, version: int) -> list[dict[str, Any]]:
    with session_scope(engine) as s:
        row = s.get(TemplateVersion, ("pets", version))
        assert row is not None
        return list(row.webhooks)


def test_a_webhook_url_sent_back_as_shown_keeps_the_stored_url_and_secret(
    client: TestClient, engine: Engine
) -> None:
    """PUT takes a whole body, and GET shows webhook URLs redacted: sending back what GET
    returned must keep each webhook's whole URL and secret, never store the redacted form."""
    hooks = [
        {"url": f"https://hooks.slack.example/services/{i}/{uuid.uuid4().hex}", "secret": s}
        for i, s in enumerate(["a" * 16, "b" * 16])
    ]
    shown = make_template(client, webhooks=hooks)
    got = {k: shown[k] for k in ("spec", "gates", "auto_promote", "description")}
    got["webhooks"] = [{"url": w["url"]} for w in shown["webhooks"]]
    r = client.put("/api/v1/templates/pets", json=got)
    assert r.status_code == 200 and r.headers["X-Tuneplane-Unchanged"] == "true", r.text
    # Two on one host are told apart by their tags, each kept with its own secret.
    assert len({w["url"] for w in shown["webhooks"]}) == 2
    r = client.put("/api/v1/templates/pets", json={**got, "description": "edited"})
    assert r.status_code == 200 and r.json()["version"] == 2, r.text
    assert _stored_webhooks(engine, 2) == hooks
    new_secret = "c" * 16
    one = {**got, "webhooks": [{"url": got["webhooks"][0]["url"], "secret": new_secret}]}
    assert client.put("/api/v1/templates/pets", json=one).json()["version"] == 3
    assert _stored_webhooks(engine, 3) == [{"url": hooks[0]["url"], "secret": new_secret}]
    # A redacted URL that stands for no stored webhook (the one just dropped) is refused, never
    # stored as a URL.
    extra = {**one, "webhooks": [*one["webhooks"], got["webhooks"][1]]}
    r = client.put("/api/v1/templates/pets", json=extra)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "body.webhooks.1.url"
    r = client.post("/api/v1/templates", json={**one, "name": "copy"})
    assert r.status_code == 422 and "give the whole URL" in r.json()["detail"]
    assert _stored_webhooks(engine, 3) == [{"url": hooks[0]["url"], "secret": new_secret}]


def test_a_shown_line_keeps_the_hook_it_was_shown_for_not_the_first_alike(
    client: TestClient, engine: Engine
) -> None:
    """Slack, Teams and Discord hooks share a host, so `display_url` shows them alike: keeping
    only the second shown line must keep the second hook (its tag says which), not the first."""
    hooks = [
        {"url": f"https://hooks.slack.example/services/{i}/{uuid.uuid4().hex}", "secret": s}
        for i, s in enumerate(["a" * 16, "b" * 16])
    ]
    shown = make_template(client, webhooks=hooks)
    body = {k: shown[k] for k in ("spec", "gates", "auto_promote", "description")}
    body["webhooks"] = [{"url": shown["webhooks"][1]["url"]}]
    r = client.put("/api/v1/templates/pets", json=body)
    assert r.status_code == 200 and r.json()["version"] == 2, r.text
    assert _stored_webhooks(engine, 2) == [hooks[1]]
    # The form logs and delivery lists show (no tag) cannot say which: refused.
    body["webhooks"] = [{"url": "https://hooks.slack.example/…"}]
    r = client.put("/api/v1/templates/pets", json=body)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "body.webhooks.0.url"
    assert _stored_webhooks(engine, 2) == [hooks[1]]


def test_a_hook_display_url_normalises_is_kept_with_its_secret(
    client: TestClient, engine: Engine
) -> None:
    """A URL with no path is shown with `/`, an upper-case host in lower case: sent back as
    shown it still keeps the stored URL and its own secret
    (the server here has no secret of its own, so one lost would be a 422). A whole URL sent
    without a secret that a stored hook has keeps that hook's secret."""
    hooks = [
        {"url": "https://ci.example", "secret": "a" * 16},
        {"url": "https://CI.example/", "secret": "b" * 16},
        {"url": "https://hooks.example/t/" + uuid.uuid4().hex, "secret": "c" * 16},
    ]
    shown = make_template(client, webhooks=hooks)
    assert [w["url"].split("#")[0] for w in shown["webhooks"]][:2] == ["https://ci.example/"] * 2
    body = {k: shown[k] for k in ("spec", "gates", "auto_promote", "description")}
    body["webhooks"] = [{"url": w["url"]} for w in reversed(shown["webhooks"][:2])]
    body["webhooks"].append({"url": hooks[2]["url"]})
    r = client.put("/api/v1/templates/pets", json=body)
    assert r.status_code == 200 and r.json()["version"] == 2, r.text
    assert _stored_webhooks(engine, 2) == [hooks[1], hooks[0], hooks[2]]


# ---- triggering ------------------------------------------------------------------------------


def test_trigger_records_template_version_and_ci_context(client: TestClient) -> None:
    make_template(client)
    ci = {"git_sha": "0123456789abcdef", "pipeline_url": "https://ci.example/runs/7", "ref": "main"}
    r = trigger(client, overrides={"num_epochs": 2}, ci=ci, tags=["nightly"])
    assert r.status_code == 201, r.text
    body = r.json()
    run_id = body["run_id"]
    assert r.headers["location"] == f"/api/v1/runs/{run_id}"
    assert body["url"] == f"http://127.0.0.1:8000/api/v1/runs/{run_id}"
    assert body["dashboard_url"] == f"http://127.0.0.1:8000/runs/{run_id}"
    run = client.get(f"/api/v1/runs/{run_id}").json()
    assert (run["template_name"], run["template_version"]) == ("pets", 1)
    assert run["ci"] == ci
    assert run["spec"]["num_epochs"] == 2 and run["spec"]["train_size"] == 100
    assert run["name"] == "pets v1 @ 0123456789" and run["tags"] == ["nightly", "template:pets"]
    assert run["gate_status"] is None and run["status"] == "queued"
    # After an edit, new runs come from v2 and the old run still says v1.
    client.put("/api/v1/templates/pets", json={"spec": {**SPEC, "seed": 7}})
    assert trigger(client).json()["template_version"] == 2
    assert client.get(f"/api/v1/runs/{run_id}").json()["template_version"] == 1
    # The runs list finds a template's runs by its tag.
    listed = client.get("/api/v1/runs", params={"tag": "template:pets"}).json()["items"]
    assert len(listed) == 2


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"overrides": {"train_size": 0}}, "body.overrides.train_size"),
        ({"overrides": {"no_such_field": 1}}, "body.overrides.no_such_field"),
        ({"ci": {"git_sha": "not-hex"}}, "body.ci.git_sha"),
        ({"ci": {"pipeline_url": "javascript:alert(1)"}}, "body.ci.pipeline_url"),
        ({"tags": ["bad tag"]}, "body.tags"),
    ],
)
def test_bad_triggers_are_422_with_the_field(
    client: TestClient, body: dict[str, Any], field: str
) -> None:
    make_template(client)
    r = trigger(client, **body)
    assert r.status_code == 422, r.text
    assert any(e["field"].startswith(field) for e in r.json()["errors"]), r.json()


def test_idempotency_key_replays_and_conflicts(client: TestClient, engine: Engine) -> None:
    make_template(client)
    first = trigger(client, key="ci-123", ci={"git_sha": "abcdef1"})
    again = trigger(client, key="ci-123", ci={"git_sha": "abcdef1"})
    assert first.status_code == 201 and again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["run_id"] == first.json()["run_id"]
    other = trigger(client, key="ci-123", ci={"git_sha": "abcdef2"})
    assert other.status_code == 409
    with session_scope(engine) as session:
        assert session.exec(select(func.count()).select_from(Run)).one() == 1


def test_concurrent_triggers_with_one_key_start_one_run(app: Any, engine: Engine) -> None:
    """Real concurrency: twelve clients post the same trigger at once to a real server."""
    server = LiveServer(app).start()
    try:
        httpx.post(f"{server.url}/api/v1/templates", json={"name": "pets", "spec": SPEC})
        barrier = threading.Barrier(12)
        results: list[tuple[int, str]] = []

        def post() -> None:
            with httpx.Client(base_url=server.url, timeout=60) as c:
                barrier.wait()
                r = c.post(
                    "/api/v1/templates/pets/runs",
                    json={"ci": {"git_sha": "abcdef1"}},
                    headers={"Idempotency-Key": "same-key"},
                )
                results.append((r.status_code, r.json().get("run_id", r.text)))

        threads = [threading.Thread(target=post) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        server.stop()
    assert sorted(code for code, _ in results).count(201) == 1, results
    assert {code for code, _ in results} <= {200, 201}, results
    assert len({run_id for _, run_id in results}) == 1
    with session_scope(engine) as session:
        assert session.exec(select(func.count()).select_from(Run)).one() == 1


# ---- gates and champions when runs end ---------------------------------------------------------


def test_gates_champions_and_history(
    client: TestClient, engine: Engine, settings: Settings
) -> None:
    make_template(
        client,
        gates={"min_accuracy": 0.5, "no_worse_than_champion": True},
        auto_promote=True,
    )
    # 1: the first run has no champion to compare with: passes and becomes champion.
    first = finish(
        client, engine, settings, trigger(client).json()["run_id"], [True] * 90 + [False] * 10
    )
    assert first["gate_status"] == "passed", first["gate_reasons"]
    checks = {c["check"]: c for c in first["gate_reasons"]}
    assert checks["no_worse_than_champion"]["outcome"] == "not_applicable"
    assert client.get("/api/v1/templates/pets").json()["champion_run_id"] == first["id"]

    # 2: eight more errors, two fewer elsewhere: within noise (p = 0.055): passes, promoted.
    second_correct = [True] * 90 + [False] * 10
    for i in range(8):
        second_correct[i] = False
    second_correct[90] = second_correct[91] = True
    second = finish(client, engine, settings, trigger(client).json()["run_id"], second_correct)
    assert second["gate_status"] == "passed", second["gate_reasons"]
    mc = {c["check"]: c for c in second["gate_reasons"]}["no_worse_than_champion"]
    assert (mc["losses"], mc["wins"]) == (8, 2)
    assert mc["p_worse"] == pytest.approx(56 / 1024)

    # 3: nine losses and one win against the new champion: significant: fails, not promoted.
    third_correct = list(second_correct)
    flipped = [i for i, ok in enumerate(second_correct) if ok][:9]
    for i in flipped:
        third_correct[i] = False
    wrong_before = [i for i, ok in enumerate(second_correct) if not ok]
    third_correct[wrong_before[0]] = True
    third = finish(client, engine, settings, trigger(client).json()["run_id"], third_correct)
    assert third["gate_status"] == "failed"
    reason = {c["check"]: c for c in third["gate_reasons"]}["no_worse_than_champion"]["reason"]
    assert f"champion {second['id']}" in reason and "significantly worse" in reason

    history = client.get("/api/v1/templates/pets/champions").json()
    assert [h["run_id"] for h in history] == [second["id"], first["id"]]
    assert [h["current"] for h in history] == [True, False]
    assert history[0]["promoted_by"] == "auto"

    # By hand: a failed gate needs force (and says why); then it is the champion.
    r = client.post(f"/api/v1/runs/{third['id']}/promote", json={})
    assert r.status_code == 409 and r.json()["gate_reasons"]
    r = client.post(
        f"/api/v1/runs/{third['id']}/promote", json={"force": True, "note": "new eval split"}
    )
    assert r.status_code == 200 and r.json()["current"] is True
    assert r.json()["promoted_by"] == "open-mode" and r.json()["note"] == "new eval split"
    assert client.get("/api/v1/templates/pets").json()["champion_run_id"] == third["id"]


def test_run_without_final_evaluation_fails_its_gate(
    client: TestClient, engine: Engine, settings: Settings
) -> None:
    make_template(client, gates={"min_accuracy": 0.1})
    run = finish(client, engine, settings, trigger(client).json()["run_id"], None)
    assert run["status"] == "succeeded" and run["gate_status"] == "failed"
    assert "no final evaluation" in run["gate_reasons"][0]["reason"]


def test_failed_and_cancelled_runs_are_not_gated_but_are_announced(
    client: TestClient, engine: Engine, settings: Settings
) -> None:
    make_template(
        client,
        gates={"min_accuracy": 0.1},
        webhooks=[{"url": "https://ci.example/hook", "secret": "x" * 16}],
    )
    failed = finish(client, engine, settings, trigger(client).json()["run_id"], None, end="failed")
    assert failed["status"] == "failed" and failed["gate_status"] == "not_applicable"
    cancelled_id = trigger(client).json()["run_id"]
    client.post(f"/api/v1/runs/{cancelled_id}/cancel")  # queued: cancelled at once
    cancelled = client.get(f"/api/v1/runs/{cancelled_id}").json()
    assert cancelled["status"] == "cancelled" and cancelled["gate_status"] == "not_applicable"
    with session_scope(engine) as session:
        deliveries = session.exec(select(WebhookDelivery)).all()
        assert sorted(d.run_id for d in deliveries) == sorted([failed["id"], cancelled_id])
        assert all(
            d.status == "pending" and d.payload["event"] == "run.finished" for d in deliveries
        )


def test_runs_not_from_a_template_are_not_applicable(
    client: TestClient, engine: Engine, settings: Settings
) -> None:
    (run_id,) = insert_runs(engine, status=RunStatus.queued)
    client.post(f"/api/v1/runs/{run_id}/cancel")
    run = client.get(f"/api/v1/runs/{run_id}").json()
    assert run["gate_status"] == "not_applicable"
    r = client.post(f"/api/v1/runs/{run_id}/promote", json={"force": True})
    assert r.status_code == 409 and "not started from a template" in r.json()["detail"]


def test_promote_refuses_unfinished_runs(client: TestClient) -> None:
    make_template(client)
    run_id = trigger(client).json()["run_id"]
    r = client.post(f"/api/v1/runs/{run_id}/promote", json={"force": True})
    assert r.status_code == 409 and "is queued" in r.json()["detail"]
    assert client.post("/api/v1/runs/run_nope/promote").status_code == 404


def test_dashboard_pages_show_champions_history_and_gates(
    client: TestClient, engine: Engine, settings: Settings
) -> None:
    make_template(
        client,
        gates={"min_accuracy": 0.5},
        auto_promote=True,
        description='<script>alert("x")</script>',
    )
    passed = finish(
        client,
        engine,
        settings,
        trigger(client, ci={"git_sha": "abc1234"}).json()["run_id"],
        [True] * 9 + [False],
    )
    failed = finish(
        client, engine, settings, trigger(client).json()["run_id"], [True] * 2 + [False] * 8
    )
    listing = client.get("/templates")
    assert listing.status_code == 200
    assert "pets" in listing.text and f"/runs/{passed['id']}" in listing.text
    assert "<script>alert" not in listing.text and "&lt;script&gt;" in listing.text
    page = client.get("/templates/pets")
    assert page.status_code == 200
    assert "Champion history" in page.text and "current" in page.text
    assert "✓ passed" in page.text and "✕ failed" in page.text
    assert failed["id"] in page.text and "abc1234" in page.text
    assert client.get("/templates/nope").status_code == 404


@pytest.mark.parametrize(
    "url",
    [
        "http://\u00f1a]\u00db\u023a\u00fet0",
        "http://[::1",
        "https://a]b/x",
        "https://h.example:99999/",
    ],
)
def test_a_webhook_url_that_does_not_parse_is_a_422_naming_it(client: TestClient, url: str) -> None:
    # Found by schemathesis: a URL that urllib cannot split was a 500.
    assert (
        client.post("/api/v1/templates", json={"name": "odd-url", "spec": SPEC}).status_code == 201
    )
    answer = client.put(
        "/api/v1/templates/odd-url", json={"spec": SPEC, "webhooks": [{"url": url}]}
    )
    assert answer.status_code == 422, answer.text
    assert "webhooks" in answer.text
    made = client.post(
        "/api/v1/templates", json={"name": "odd-2", "spec": SPEC, "webhooks": [{"url": url}]}
    )
    assert made.status_code == 422, made.text
