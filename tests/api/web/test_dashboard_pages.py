"""The dashboard's pages over HTTP without a browser (TestClient), on SQLite and PostgreSQL:
what each page says, filters and keyset paging, the new-run form, form actions, CSRF, the log
route's limits, the live endpoint, and that no user- or model-supplied string reaches the HTML
unescaped."""

from __future__ import annotations

import html
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from markupsafe import escape
from sqlalchemy import Engine, event, insert
from sqlmodel import Session, select

from api.config import Settings
from api.events.models import ProgressPoint
from api.runs.models import Run
from api.templates.models import Champion
from tests.browser.seed import LABELS, XSS, XSS_LABEL, XSS_TAG, Seeder, seed_fleet


@pytest.fixture
def seeder(client: TestClient, engine: Engine, settings: Settings) -> Seeder:
    return Seeder(engine, settings, client)


def form_fields(page: str, action: str | None = None) -> dict[str, str]:
    """The hidden CSRF and idempotency fields of the (first, or `action`'s) form on a page."""
    if action is not None:
        start = page.index(f'action="{action}"')
        page = page[start : page.index("</form>", start)]
    token = re.search(r'name="csrf_token" value="([^"]+)"', page)
    key = re.search(r'name="form_key" value="([^"]+)"', page)
    assert token and key, "no form on the page"
    return {"csrf_token": token.group(1), "form_key": key.group(1)}


def spec_form(**changes: str) -> dict[str, str]:
    """A complete new-run form, as a browser submits it (every field, as text)."""
    values = {
        "name": "from the form",
        "tags": "form",
        "notes": "",
        "model_id": "google/gemma-3-4b-it",
        "dataset": "digits",
        "train_size": "200",
        "eval_size": "50",
        "num_epochs": "1.0",
        "learning_rate": "0.0002",
        "batch_size": "4",
        "gradient_accumulation_steps": "4",
        "eval_batch_size": "16",
        "lora_r": "16",
        "lora_alpha": "32",
        "lora_dropout": "0.05",
        "lora_target_modules": "q_proj, v_proj",
        "max_length": "512",
        "max_new_tokens": "16",
        "gradient_checkpointing": "on",
        "checkpointing": "auto",
        "micro_batch_size": "auto",
        "quantization": "nf4",
        "kernels": "auto",
        "eval_mode": "score",
        "save_steps": "50",
        "seed": "7",
        "gpu_type": "nvidia-l4",
        "time_budget_minutes": "55",
    }
    values.update(changes)
    return values


def field_error(page: str, name: str) -> str | None:
    match = re.search(rf'<p class="field-error" id="err-{name}">(.*?)</p>', page, re.S)
    return html.unescape(re.sub(r"<[^>]+>", "", match.group(1))).strip() if match else None


# ---- every page, and escaping ------------------------------------------------------------------


def test_every_page_renders_and_escapes_every_supplied_string(
    client: TestClient, seeder: Seeder
) -> None:
    fleet = seed_fleet(seeder)
    pages = {
        "/": ["gemma-4b lr 3e-4", "✓</span> succeeded", "running", "failed", "cancelled", "queued"],
        "/history": ["google/gemma-3-4b-it", "oxford-iiit-pet", f'href="/runs/{fleet.improved}"'],
        f"/runs/{fleet.succeeded}": [
            "Baseline vs final",
            "Per class",
            "Confusion matrix",
            "Sample predictions",
            "Timeline",
        ],
        f"/runs/{fleet.running}": [
            "Cancel run",
            'data-live-active="1"',
            "step <strong>10</strong> of 60",
        ],
        f"/runs/{fleet.failed}": ["CUDA out of memory", "Traceback"],
        f"/runs/{fleet.cancelled}": ["superseded: "],
        f"/runs/{fleet.queued}": ["Queued: waits for a free GPU slot."],
        f"/runs/{fleet.xss}": ["Confusion matrix"],
        f"/compare?ids={fleet.improved},{fleet.xss}": ["Spec differences", "learning_rate"],
        "/runs/new": ["Create run"],
        f"/runs/new?from={fleet.xss}": ["Starting from the spec of"],
        "/?q=" + XSS: ["1 matching"],
    }
    for path, needles in pages.items():
        response = client.get(path)
        assert response.status_code == 200, path
        assert response.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in response.headers["content-security-policy"]
        body = response.text
        for needle in needles:
            assert needle in body, (path, needle)
        # No supplied markup survives as markup: neither a tag nor a broken-out attribute.
        for raw in (
            "<script>window",
            "<img src=x",
            "<svg onload",
            'id="xss-bold"',
            "</textarea><b",
        ):
            assert raw not in body, (path, raw)
    xss_page = client.get(f"/runs/{fleet.xss}").text
    assert str(escape(XSS)) in xss_page  # the name and the notes, as text
    assert str(escape(XSS_TAG)) in xss_page
    assert str(escape(XSS_LABEL)) in xss_page  # per-class table and heatmap
    assert "I cannot tell &lt;b&gt;which&lt;/b&gt; breed." in xss_page  # raw model answers
    assert 'href="javascript:' not in xss_page
    assert str(escape(XSS)) in client.get(f"/runs/{fleet.cancelled}").text


def test_unknown_runs_and_bad_queries_get_html_pages(client: TestClient) -> None:
    for path, status, text in [
        ("/runs/run_nope", 404, "There is no run with the id"),
        ("/runs/run_nope/log", 404, "There is no run with the id"),
        ("/runs/new?from=run_nope", 404, "There is no run with the id"),
        ("/?status=bogus", 400, "unknown status"),
        ("/?limit=0", 400, "limit must be between 1 and 200"),
        ("/?limit=x", 400, "limit must be a whole number"),
        ("/?after=not-a-cursor", 400, "this page link is damaged"),
    ]:
        response = client.get(path)
        assert response.status_code == status, path
        assert response.headers["content-type"].startswith("text/html")
        assert text in response.text, path
    live = client.get("/runs/run_nope/live")
    assert live.status_code == 404 and live.json() == {"error": "run not found"}


# ---- runs list ---------------------------------------------------------------------------------


def test_filters_by_status_model_tag_and_text(client: TestClient, seeder: Seeder) -> None:
    a = seeder.create("100% sure", tags=["alpha"])
    b = seeder.create(
        "x_y", tags=["beta"], model_id="google/gemma-3-12b-it", gpu_type="nvidia-rtx-pro-6000"
    )
    c = seeder.create("1000 sure xzy", notes="mentions needle in its notes", tags=["alpha", "beta"])
    seeder.cancel(c)

    def ids(query: str) -> set[str]:
        response = client.get("/" + query)
        assert response.status_code == 200, response.text
        return set(re.findall(r'<span class="id">(run_[0-9a-f]+)</span>', response.text))

    assert ids("") == {a, b, c}
    assert ids("?status=cancelled") == {c}
    assert ids("?status=queued") == {a, b}
    assert ids("?model=google/gemma-3-12b-it") == {b}
    assert ids("?tag=alpha") == {a, c}
    assert ids("?tag=beta&status=queued") == {b}
    # LIKE wildcards in the search box are literal characters.
    assert ids("?q=100%25") == {a}
    assert ids("?q=x_y") == {b}
    assert ids("?q=SURE") == {a, c}
    assert ids("?q=NEEDLE") == {c}  # notes, case-insensitive
    assert ids(f"?q={b[4:12]}") == {b}  # part of an id
    assert ids("?q=nothing-like-this") == set()
    page = client.get("/?status=queued").text
    assert "2 matching" in page
    assert 'class="chip chip-queued on"' in page


def test_keyset_pages_cover_every_run_once_in_both_directions(
    client: TestClient, seeder: Seeder
) -> None:
    made = [seeder.create(f"run {i}") for i in range(7)]

    def page(url: str) -> tuple[list[str], str | None, str | None]:
        body = client.get(url).text
        ids = re.findall(r'<span class="id">(run_[0-9a-f]+)</span>', body)
        older = re.search(r'rel="next" class="button subtle" href="([^"]+)"', body)
        newer = re.search(r'rel="prev" class="button subtle" href="([^"]+)"', body)
        unescape = html.unescape
        return ids, older and unescape(older.group(1)), newer and unescape(newer.group(1))

    seen: list[list[str]] = []
    url: str | None = "/?limit=3"
    back: str | None = None
    while url:
        ids, url, back = page(url)
        seen.append(ids)
    assert [len(p) for p in seen] == [3, 3, 1]
    assert [i for p in seen for i in p] == list(reversed(made))  # newest first, each once
    # And back again from the last page.
    assert back is not None
    ids, _, back = page(back)
    assert ids == seen[1] and back is not None
    ids, _, back = page(back)
    assert ids == seen[0] and back is None


# ---- history -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "args", "shown"),
    [(0, ("run",), "0 runs"), (1, ("finished run",), "1 finished run"),
     (2, ("finished run",), "2 finished runs"), (1, ("class", "classes"), "1 class"),
     (37, ("class", "classes"), "37 classes")],
)  # fmt: skip
def test_counts_agree_with_their_noun(n: int, args: tuple[str, ...], shown: str) -> None:
    from api.wording import count

    assert count(n, *args) == shown


def test_history_groups_finished_runs_by_model_and_data_set(
    client: TestClient, seeder: Seeder
) -> None:
    pets = [
        seeder.succeeded_run(f"pets {i}", [0.4] * 4, [0.6 + 0.1 * i] * 4, steps=3) for i in range(3)
    ]
    digits = seeder.succeeded_run("digits", [0.1] * 4, [0.9] * 4, steps=3, dataset="digits")
    seeder.failed_run("broken", "boom")  # not finished well: not in the history
    body = client.get("/history").text
    assert body.count('<section class="card group">') == 2
    for run_id in [*pets, digits]:
        assert body.count(f'href="/runs/{run_id}" class="pt"') == 2  # accuracy and macro F1
    assert "broken" not in body
    # Another run finishing shows at once (the per-group counts are cached until one does).
    assert "3 finished runs" in body
    # digits: singular, in the group's line and in its charts' labels
    assert body.count("1 finished run") >= 3 and "1 finished runs" not in body
    pets.append(seeder.succeeded_run("pets 3", [0.4] * 4, [0.95] * 4, steps=2))
    body = client.get("/history").text
    assert "4 finished runs" in body and f'href="/runs/{pets[-1]}" class="pt"' in body
    only = client.get(
        "/history", params={"model": "google/gemma-3-4b-it", "dataset": "digits"}
    ).text
    assert (
        only.count('<section class="card group">') == 1 and digits in only and pets[0] not in only
    )


# ---- run page ----------------------------------------------------------------------------------


def test_run_page_downsamples_a_long_loss_curve(
    client: TestClient, seeder: Seeder, engine: Engine
) -> None:
    run_id = seeder.running_run("long", steps_done=1, total=20_000)
    with Session(engine) as session:
        session.execute(
            insert(ProgressPoint),
            [
                {
                    "run_id": run_id,
                    "step": s,
                    "total_steps": 20_000,
                    "epoch": s / 20_000,
                    "loss": 2 / (1 + s / 500),
                    "segment": 0,
                }
                for s in range(2, 20_001)
            ],
        )
        session.commit()
    body = client.get(f"/runs/{run_id}").text
    path = re.search(r'<svg class="chart chart-loss".*?<path d="([^"]+)"', body, re.S)
    assert path is not None
    assert len(re.findall(r"[ML]", path.group(1))) == 400
    assert "400 of 20000 points drawn" in body


def test_class_table_is_worst_first_and_sorts_by_any_column(
    client: TestClient, seeder: Seeder
) -> None:
    run_id = seeder.succeeded_run("classes", [0.2] * 6, [0.9, 0.4, 1.0, 0.6, 0.8, 0.7], steps=3)

    def column(query: str, name: str) -> list[str]:
        body = client.get(f"/runs/{run_id}{query}").text
        table = body[body.index('<table class="compact classes"') :]
        table = table[: table.index("</table>")]
        return re.findall(rf'data-label="{name}" data-value="([^"]*)"', table)

    f1 = [float(v) for v in column("", "F1")]
    assert f1 == sorted(f1) and len(f1) == 6
    f1 = [float(v) for v in column("?sort=f1&dir=desc", "F1")]
    assert f1 == sorted(f1, reverse=True)
    labels = column("?sort=label", "Class")
    assert labels == sorted(labels, key=str.lower)
    assert column("?sort=bogus", "F1") == column("", "F1")  # an unknown column: the default


def test_live_endpoint_reports_fragments_until_the_run_ends(
    client: TestClient, seeder: Seeder
) -> None:
    run_id = seeder.running_run("live", steps_done=2, total=10)
    body = client.get(f"/runs/{run_id}/live").json()
    assert body["active"] is True and body["status"] == "running" and body["last_step"] == 2
    assert set(body["html"]) == {"header", "progress", "timeline", "results"}
    assert "step <strong>2</strong> of 10" in body["html"]["progress"]
    seeder.progress(run_id, range(3, 11), 10)
    seeder.completed(run_id, 10)
    body = client.get(f"/runs/{run_id}/live").json()
    assert body["active"] is False and body["status"] == "succeeded"
    assert "Cancel run" not in body["html"]["header"]


# ---- log route ---------------------------------------------------------------------------------


def _set_log(engine: Engine, run_id: str, uri: str | None) -> None:
    with Session(engine) as session:
        run = session.get(Run, run_id)
        assert run is not None
        run.log_uri = uri
        session.add(run)
        session.commit()


def test_log_route_serves_only_a_local_file_inside_the_data_dir(
    client: TestClient, seeder: Seeder, engine: Engine, settings: Settings, tmp_path: Path
) -> None:
    run_id = seeder.create("logged")
    seeder.dispatch(run_id, log_text="<script>alert(1)</script> step 1\n")
    response = client.get(f"/runs/{run_id}/log")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.text == "<script>alert(1)</script> step 1\n"
    assert f'href="/runs/{run_id}/log"' in client.get(f"/runs/{run_id}").text

    log = settings.logs_dir / f"{run_id}.log"
    _set_log(engine, run_id, log.resolve().as_uri())  # file:// works too
    assert client.get(f"/runs/{run_id}/log").status_code == 200

    outside = tmp_path / "secret.txt"
    outside.write_text("not for the browser")
    link = settings.logs_dir / "link.log"
    os.symlink(outside, link)
    for uri in (
        str(outside),
        str(settings.logs_dir / ".." / ".." / "secret.txt"),
        str(link),  # inside by name, outside by target
        "/etc/passwd",
        str(settings.logs_dir / "missing.log"),
        "gs://bucket/logs/run.log",
    ):
        _set_log(engine, run_id, uri)
        response = client.get(f"/runs/{run_id}/log")
        assert response.status_code == 404, uri
        assert "not for the browser" not in response.text
    _set_log(engine, run_id, "https://console.cloud.google.com/logs?q=run")
    assert (
        'href="https://console.cloud.google.com/logs?q=run"' in client.get(f"/runs/{run_id}").text
    )
    _set_log(engine, run_id, "javascript:alert(1)")
    page = client.get(f"/runs/{run_id}").text
    assert 'href="javascript' not in page and "javascript:alert(1)" in page


# ---- forms -------------------------------------------------------------------------------------


def test_new_run_form_defaults_errors_and_creation(client: TestClient, engine: Engine) -> None:
    page = client.get("/runs/new").text
    assert 'id="f-train_size" name="train_size" value="1000"' in page  # RunSpec's default
    assert 'id="f-lora_target_modules" name="lora_target_modules" value="q_proj, k_proj,' in page
    fields = form_fields(page)

    bad = client.post(
        "/runs/new",
        data={
            **fields,
            **spec_form(
                model_id="", train_size="0", lora_dropout="", tags="bad tag!", dataset="imagefolder"
            ),
        },
    )
    assert bad.status_code == 422
    assert field_error(bad.text, "model_id") == "⚠ is required"
    assert field_error(bad.text, "train_size") == "⚠ must be between 1 and 1000000 (got '0')"
    assert "valid number" in (field_error(bad.text, "lora_dropout") or "")
    assert "needs a directory" in (field_error(bad.text, "dataset") or "")
    assert "bad tag" in (field_error(bad.text, "tags") or "")
    assert field_error(bad.text, "eval_size") is None
    assert 'value="bad tag!"' in bad.text  # what was typed comes back

    fields = form_fields(bad.text)
    good = client.post("/runs/new", data={**fields, **spec_form()}, follow_redirects=False)
    assert good.status_code == 303
    run_id = good.headers["location"].removeprefix("/runs/").removesuffix("?notice=created")
    with Session(engine) as session:
        run = session.get(Run, run_id)
        assert run is not None and run.status == "queued" and run.name == "from the form"
        assert run.spec["lora_target_modules"] == ["q_proj", "v_proj"]
        assert run.spec["gradient_checkpointing"] is True and run.spec["lora_vision"] is False
    # The same form sent again (a double click, a reload of the POST) is the same run.
    again = client.post("/runs/new", data={**fields, **spec_form()}, follow_redirects=False)
    assert again.headers["location"] == good.headers["location"]
    with Session(engine) as session:
        assert len(session.exec(select(Run)).all()) == 1


def test_a_run_that_cannot_fit_is_refused_at_the_gpu_field(client: TestClient) -> None:
    fields = form_fields(client.get("/runs/new").text)
    response = client.post(
        "/runs/new", data={**fields, **spec_form(model_id="google/gemma-3-27b-it", batch_size="8")}
    )
    assert response.status_code == 422
    assert "GiB" in (field_error(response.text, "gpu_type") or "")
    assert "Run does not fit the GPU" in response.text


def test_cancel_and_retrain_forms(client: TestClient, seeder: Seeder, engine: Engine) -> None:
    run_id = seeder.running_run("to cancel", steps_done=1)
    page = client.get(f"/runs/{run_id}").text
    response = client.post(
        f"/runs/{run_id}/cancel",
        data=form_fields(page, f"/runs/{run_id}/cancel"),
        follow_redirects=False,
    )
    assert (
        response.status_code == 303
        and response.headers["location"] == f"/runs/{run_id}?notice=cancel-requested"
    )
    page = client.get(response.headers["location"]).text
    assert "Cancel requested." in page and "badge-cancelling" in page

    done = seeder.succeeded_run("done", [0.3] * 4, [0.8] * 4, steps=2, tags=["keep"])
    page = client.get(f"/runs/{done}").text
    assert f'action="/runs/{done}/cancel"' not in page
    # A stale page's Cancel on a finished run: the service's 409, said on the run's page.
    stale = client.post(f"/runs/{done}/cancel", data=form_fields(page, f"/runs/{done}/retrain"))
    assert stale.status_code == 409
    assert "Run already finished" in stale.text and "badge-succeeded" in stale.text

    response = client.post(
        f"/runs/{done}/retrain",
        data=form_fields(page, f"/runs/{done}/retrain"),
        follow_redirects=False,
    )
    assert response.status_code == 303
    new_id = response.headers["location"].split("/")[2].split("?")[0]
    with Session(engine) as session:
        new = session.get(Run, new_id)
        assert new is not None and new.parent_id == done and new.status == "queued"
    assert f'Retrain of <a href="/runs/{done}">' in client.get(f"/runs/{new_id}").text


def test_forms_without_a_valid_token_are_refused(
    client: TestClient, seeder: Seeder, app: object, engine: Engine
) -> None:
    run_id = seeder.create("target")
    page = client.get(f"/runs/{run_id}").text
    good = form_fields(page, f"/runs/{run_id}/cancel")
    cookie = client.cookies.get("tuneplane_csrf")
    assert cookie
    attempts: list[tuple[dict[str, str], dict[str, str]]] = [
        ({}, {"tuneplane_csrf": cookie}),  # no token
        ({**good, "csrf_token": "f" * 64}, {"tuneplane_csrf": cookie}),  # wrong token
        (good, {}),  # no cookie (a cross-site POST under SameSite=Lax)
        (good, {"tuneplane_csrf": "A" * 43}),  # another browser's nonce
    ]
    for data, cookies in attempts:
        with TestClient(app, cookies=cookies) as other:  # type: ignore[arg-type]
            for path in (
                f"/runs/{run_id}/cancel",
                f"/runs/{run_id}/retrain",
                f"/runs/{run_id}/promote",
                "/runs/new",
            ):
                response = other.post(
                    path,
                    data={**data, **(spec_form() if path == "/runs/new" else {})},
                    follow_redirects=False,
                )
                assert response.status_code == 403, (path, data.keys(), cookies.keys())
                assert "Form expired or forged" in response.text
    with Session(engine) as session:
        runs = session.exec(select(Run)).all()
        assert [r.status for r in runs] == ["queued"]  # nothing was cancelled or created


# ---- gates, champions, promotion ---------------------------------------------------------------

# Champion and challenger evaluate the same 36 samples; the challenger gets classes 2 and 3 half
# wrong and class 5 all wrong (its mistakes land on the next class, or on no label).
GOOD = [1.0] * 6
WORSE = [1.0, 1.0, 0.5, 0.5, 1.0, 0.0]
GATE_LABELS = [XSS_LABEL, *LABELS[1:]]


def row_of(page: str, run_id: str) -> str:
    """The runs table's row of one run."""
    rows = [r for r in page.split("<tr>") if f'<span class="id">{run_id}</span>' in r]
    assert len(rows) == 1, run_id
    return rows[0]


def crowned(page: str) -> set[str]:
    """The runs the runs list marks as a current champion."""
    return {
        m
        for r in page.split("<tr>")[1:]
        if "champion-mark" in r
        for m in re.findall(r'<span class="id">(run_[0-9a-f]+)</span>', r)
    }


def gate_section(page: str) -> str:
    start = page.index('<div class="gate ')
    return page[start : page.index('<div class="actions">', start)]


def stored_run(engine: Engine, run_id: str) -> Run:
    with Session(engine) as session:
        run = session.get(Run, run_id)
        assert run is not None
        return run


def test_gate_reasons_champion_marks_and_promotion_by_form(
    client: TestClient, seeder: Seeder, engine: Engine
) -> None:
    seeder.template(
        "pets",
        {"min_accuracy": 0.3, "no_worse_than_champion": True, "max_class_f1_drop": 0.1},
        auto_promote=True,
    )
    champ = seeder.template_run("pets", GOOD, GATE_LABELS)
    worse = seeder.template_run("pets", WORSE, GATE_LABELS)
    assert stored_run(engine, champ).gate_status == "passed"
    recorded = stored_run(engine, worse)
    assert recorded.status == "succeeded" and recorded.gate_status == "failed"

    # The failed gate's reasons, each check by name and outcome, with the p-value of the paired
    # test (12 samples the champion got right and this run got wrong, none the other way).
    page = client.get(f"/runs/{worse}").text
    gate = gate_section(page)
    assert "Quality gate: <strong>✕ failed</strong>" in gate
    assert "No worse than the champion (McNemar)" in gate
    assert f"got 12 wrong that champion {champ} got right and 0 right" in gate
    assert f"p = {0.5**12:.4g} &lt; 0.05: significantly worse" in gate
    assert "Minimum accuracy" in gate and "meets the minimum 0.3000" in gate
    assert f'href="/compare?ids={champ},{worse}"' in gate
    # Every class that lost F1, in a table, labels escaped (one of them is markup).
    drops = next(c for c in recorded.gate_reasons or [] if c["check"] == "max_class_f1_drop")
    lost = [d for d in drops["drops"] if d["champion_f1"] > d["f1"]]
    assert len(lost) == 5
    table = gate[gate.index('<table class="compact drops">') : gate.index("</table>")]
    assert table.count("<tr>") == 1 + len(lost)
    for d in lost:
        assert f'<th scope="row">{escape(d["label"])}</th>' in table
    assert XSS_LABEL not in page and str(escape(XSS_LABEL)) in table
    # A failed gate offers "promote anyway" with a note, not the plain button.
    assert "★ Promote to champion" not in page and "Promote anyway" in page

    champ_page = client.get(f"/runs/{champ}").text
    assert "current champion of template" in champ_page
    assert "Quality gate: <strong>✓ passed</strong>" in champ_page
    assert "not applicable" in gate_section(champ_page)  # no champion before it to compare
    assert "Promote" not in champ_page
    listing = client.get("/").text
    assert crowned(listing) == {champ}
    assert "current champion of template pets" in row_of(listing, champ)

    # The plain promotion of a run whose gate failed (a stale page, a hand-made POST): the
    # service's refusal on the run's page, with the reasons, not a 500; nothing changes.
    refused = client.post(
        f"/runs/{worse}/promote", data=form_fields(page, f"/runs/{worse}/promote")
    )
    assert refused.status_code == 409
    assert "Gate failed: this run failed its quality gate" in refused.text
    assert "significantly worse" in gate_section(refused.text)
    assert crowned(client.get("/").text) == {champ}
    too_long = client.post(
        f"/runs/{worse}/promote",
        data={**form_fields(page, f"/runs/{worse}/promote"), "force": "1", "note": "x" * 2001},
    )
    assert too_long.status_code == 422 and "Note too long" in too_long.text

    # Promote anyway, saying why.
    response = client.post(
        f"/runs/{worse}/promote",
        data={
            **form_fields(page, f"/runs/{worse}/promote"),
            "force": "1",
            "note": "new eval split <b>",
        },
        follow_redirects=False,
    )
    assert response.status_code == 303
    assert response.headers["location"] == f"/runs/{worse}?notice=promoted"
    page = client.get(response.headers["location"]).text
    assert "Promoted: this run is now its template&#39;s champion." in page
    assert "current champion of template" in page and "Promote anyway" not in page
    assert crowned(client.get("/").text) == {worse}
    assert "current champion of template" not in client.get(f"/runs/{champ}").text
    history = client.get("/api/v1/templates/pets/champions").json()
    assert [h["run_id"] for h in history] == [worse, champ]
    assert history[0]["note"] == "new eval split <b>" and history[0]["promoted_by"] == "open-mode"


def test_promote_button_and_the_refusals_it_can_meet(
    client: TestClient, seeder: Seeder, engine: Engine
) -> None:
    seeder.template("manual", {"min_accuracy": 0.5})  # no auto-promotion
    passed = seeder.template_run("manual", GOOD)
    page = client.get(f"/runs/{passed}").text
    assert "Quality gate: <strong>✓ passed</strong>" in page
    assert "★ Promote to champion" in page and "Promote anyway" not in page
    assert crowned(client.get("/").text) == set()
    response = client.post(
        f"/runs/{passed}/promote",
        data=form_fields(page, f"/runs/{passed}/promote"),
        follow_redirects=False,
    )
    assert response.status_code == 303
    assert crowned(client.get("/").text) == {passed}
    assert "★ Promote to champion" not in client.get(f"/runs/{passed}").text

    # A run not from a template: no gate to show, no button; a POST is refused on its page.
    plain = seeder.succeeded_run("plain", [0.3] * 6, [0.8] * 6, steps=2)
    page = client.get(f"/runs/{plain}").text
    assert "Quality gate" not in page and "Promote" not in page
    refused = client.post(
        f"/runs/{plain}/promote", data=form_fields(page, f"/runs/{plain}/retrain")
    )
    assert refused.status_code == 409
    assert "Not a template run" in refused.text and "badge-succeeded" in refused.text
    # A template run that has not finished.
    queued = client.post("/api/v1/templates/manual/runs", json={}).json()["run_id"]
    page = client.get(f"/runs/{queued}").text
    assert "Promote" not in page and "From template" in page
    refused = client.post(
        f"/runs/{queued}/promote", data=form_fields(page, f"/runs/{queued}/cancel")
    )
    assert refused.status_code == 409 and "Run not succeeded" in refused.text
    for action in ("cancel", "retrain", "promote"):
        missing = client.post(f"/runs/run_nope/{action}", data=form_fields(page))
        assert missing.status_code == 404 and "There is no run with the id" in missing.text

    # A hidden (deleted) template has no champion to show.
    assert client.delete("/api/v1/templates/manual").status_code in (200, 204)
    assert crowned(client.get("/").text) == set()
    assert "current champion" not in client.get(f"/runs/{passed}").text


@contextmanager
def champion_queries(app: FastAPI) -> Iterator[list[str]]:
    """The SQL statements that read the champions table while the block runs."""
    seen: list[str] = []
    engine = app.state.engine

    def note(_c: Any, _cur: Any, statement: str, *_args: Any) -> None:
        if "champions" in statement:
            seen.append(statement)

    event.listen(engine, "before_cursor_execute", note)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", note)


def test_runs_list_marks_champions_in_one_query(
    client: TestClient, seeder: Seeder, app: FastAPI, engine: Engine
) -> None:
    champions = []
    for i in range(3):
        seeder.template(f"t{i}", {"min_accuracy": 0.1}, auto_promote=True)
        first = seeder.template_run(f"t{i}", GOOD)
        champions.append(seeder.template_run(f"t{i}", GOOD))  # promoted after `first`
        assert first not in champions
    seeder.create("not a template run")
    with champion_queries(app) as seen:
        page = client.get("/").text
    assert crowned(page) == set(champions)
    assert len(seen) == 1, seen
    # Promotions in the same instant: the higher id is the newer (as current_champion orders).
    with Session(engine) as session:
        rows = session.exec(select(Champion).where(Champion.template_name == "t0")).all()
        for row in rows:
            row.promoted_at = rows[0].promoted_at
            session.add(row)
        session.commit()
        newest = max(rows, key=lambda r: r.id or 0).run_id
    assert newest == champions[0]
    assert crowned(client.get("/").text) == set(champions)


# ---- compare -----------------------------------------------------------------------------------


def test_compare_needs_two_to_eight_existing_runs(client: TestClient, seeder: Seeder) -> None:
    a = seeder.create("a", learning_rate=1e-4)
    b = seeder.create("b", learning_rate=3e-4, lora_r=8)
    assert "Run ids, separated by commas" in client.get("/compare").text
    assert client.get(f"/compare?ids={a}").status_code == 400
    assert client.get("/compare?ids=" + ",".join(f"run_{i}" for i in range(9))).status_code == 400
    missing = client.get(f"/compare?ids={a},run_missing")
    assert missing.status_code == 404 and "run_missing" in missing.text
    body = client.get(f"/compare?ids={a}&ids={b}").text
    differing = body[body.index("Spec differences") : body.index("Every field")]
    assert re.findall(r"<code>(\w+)</code>", differing) == ["learning_rate", "lora_r"]
    assert "None of these runs has a final evaluation yet." in body


def test_static_files_are_served_by_the_api(client: TestClient) -> None:
    for path, kind in (
        ("/static/dashboard.css", "text/css"),
        ("/static/dashboard.js", "javascript"),
        ("/static/favicon.svg", "image/svg"),
    ):
        response = client.get(path)
        assert response.status_code == 200 and kind in response.headers["content-type"], path
    page = client.get("/").text
    # Nothing on a page comes from elsewhere.
    assert not re.search(r'(?:src|href)="(?:https?:)?//', page)
