"""The dashboard's template forms over HTTP (TestClient), on SQLite and PostgreSQL: create a
template, edit it (a new version), delete it, start a run of it; errors shown beside their
fields (never a 500); forms without a valid CSRF token refused; and, with auth on, a session
without `runs:write` refused."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from html.parser import HTMLParser

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlmodel import Session, select

from api.auth.models import TokenCreate
from api.auth.tokens import create_token
from api.config import Settings
from api.db import make_engine, migrate, session_scope
from api.main import create_app
from api.notify.models import template_url
from api.runs.models import Run
from api.templates.models import TemplateVersion
from tests.api.templating import make_template
from tests.api.web.test_dashboard_pages import field_error, form_fields

SECRET = "a-webhook-secret-of-the-server-32"


class _Form(HTMLParser):
    """What a browser submits for one form of a page: every named input, ticked boxes (as their
    value, else `on`), each select's selected (else first) option, each textarea's text."""

    def __init__(self, action: str) -> None:
        super().__init__(convert_charrefs=True)
        self.action, self.inside = action, False
        self.data: dict[str, str] = {}
        self._select = self._textarea = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.inside = a.get("action") == self.action
        if not self.inside:
            return
        name = a.get("name", "")
        if tag == "input" and a.get("type") == "checkbox":
            if name and "checked" in a:
                self.data[name] = a.get("value") or "on"
        elif tag == "input" and name:
            self.data[name] = a.get("value", "")
        elif tag == "select":
            self._select = name
        elif tag == "option" and self._select:
            if "selected" in a or self._select not in self.data:
                self.data[self._select] = a.get("value", "")
        elif tag == "textarea":
            self._textarea = name
            self.data[name] = ""

    def handle_data(self, data: str) -> None:
        if self._textarea:
            self.data[self._textarea] += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self.inside = False
        elif tag == "select":
            self._select = ""
        elif tag == "textarea":
            self._textarea = ""


def browser_form(page: str, action: str, **changes: str) -> dict[str, str]:
    parser = _Form(action)
    parser.feed(page)
    assert parser.data, f"no form with action {action!r} on the page"
    return {**parser.data, **changes}


def created_template(client: TestClient, **changes: str) -> httpx.Response:
    page = client.get("/templates/_new").text
    form = browser_form(page, "/templates/_new", **changes)
    return client.post("/templates/_new", data=form, follow_redirects=False)


def stored_version(engine: Engine, name: str, version: int) -> TemplateVersion:
    with Session(engine) as session:
        row = session.get(TemplateVersion, (name, version))
        assert row is not None
        return row


GOOD = {
    "name": "pets-4b",
    "description": "nightly pets",
    "model_id": "google/gemma-3-4b-it",
    "dataset": "digits",
    "train_size": "200",
    "lora_target_modules": "q_proj, v_proj",
    "gates.min_accuracy": "0.8",
    "gates.max_class_f1_drop": "0.1",
    "gates.no_worse_than_champion": "on",
}


# ---- create ------------------------------------------------------------------------------------


def test_create_form_starts_at_the_defaults_and_makes_version_1(
    client: TestClient, engine: Engine
) -> None:
    page = client.get("/templates/_new").text
    defaults = browser_form(page, "/templates/_new")
    assert defaults["train_size"] == "1000" and defaults["gpu_type"] == "nvidia-l4"  # RunSpec's
    assert defaults["gates.significance"] == "0.05" and defaults["gates.min_accuracy"] == ""
    assert "gates.no_worse_than_champion" not in defaults  # an unticked box

    r = created_template(client, **GOOD)
    assert (
        r.status_code == 303
        and r.headers["location"] == "/templates/pets-4b?notice=template-created"
    )
    shown = client.get(r.headers["location"]).text
    assert "Template created." in shown and "v1" in shown
    t = client.get("/api/v1/templates/pets-4b").json()
    assert t["version"] == 1 and t["description"] == "nightly pets"
    assert t["spec"]["train_size"] == 200 and t["spec"]["lora_target_modules"] == [
        "q_proj",
        "v_proj",
    ]
    assert t["spec"]["gradient_checkpointing"] is True  # ticked by default, sent as "on"
    gates = t["gates"]
    assert gates["min_accuracy"] == 0.8 and gates["max_class_f1_drop"] == 0.1
    assert gates["no_worse_than_champion"] is True
    assert gates["min_macro_f1"] is None and gates["max_unknown_rate"] is None  # empty: off
    assert t["auto_promote"] is False and t["webhooks"] == []
    assert stored_version(engine, "pets-4b", 1).created_by == "open-mode"
    # Listed, with a way to make another.
    listing = client.get("/templates").text
    assert 'href="/templates/pets-4b"' in listing and 'href="/templates/_new"' in listing


def test_a_template_named_new_keeps_its_page(client: TestClient) -> None:
    make_template(client, name="new")
    assert "Start a run of v1" in client.get("/templates/new").text
    assert "Create template" in client.get("/templates/_new").text


def test_copy_prefills_from_another_template(client: TestClient, engine: Engine) -> None:
    hook = {"url": "https://hooks.example.com/T0/B0-token-path", "secret": "s" * 16}
    make_template(client, name="pets", gates={"min_macro_f1": 0.7}, webhooks=[hook])
    page = client.get("/templates/_new?from=pets").text
    form = browser_form(page, "/templates/_new")
    assert form["name"] == "" and form["train_size"] == "100"
    assert form["gates.min_macro_f1"] == "0.7"
    # The copy's webhook is shown redacted, and stands for the source's whole URL and secret,
    # also when the form comes back with an error first.
    assert form["webhooks"] == template_url(hook["url"]) and "B0-token-path" not in page
    assert form["webhooks"].startswith("https://hooks.example.com/…#k=")
    bad = client.post("/templates/_new", data={**form, "name": "Bad Name"})
    assert bad.status_code == 422
    again = browser_form(bad.text, "/templates/_new")
    r = client.post("/templates/_new", data={**again, "name": "copy"}, follow_redirects=False)
    assert r.status_code == 303, r.text
    assert stored_version(engine, "copy", 1).webhooks == [hook]
    missing = client.get("/templates/_new?from=nope")
    assert missing.status_code == 404 and "there is no template named" in missing.text


def test_a_copy_resolves_its_lines_against_the_template_it_was_copied_from_only(
    client: TestClient, engine: Engine
) -> None:
    """The hidden `from` names the template a Copy page was for. Its shown lines stand for
    that template's hooks only: with `from` changed to another template, one with a hook on
    the same host, they resolve to nothing (a 422), never to the other template's hook and
    secret; without `from` neither."""
    hooks = {
        n: {"url": f"https://hooks.slack.example/{n}/{n}-token", "secret": n[0] * 16}
        for n in ("pets", "birds")
    }
    for n, hook in hooks.items():
        make_template(client, name=n, webhooks=[hook])
    form = browser_form(client.get("/templates/_new?from=pets").text, "/templates/_new")
    assert form["from"] == "pets"
    for source in ({"from": "birds"}, {"from": ""}):
        r = client.post("/templates/_new", data={**form, **source, "name": "copy"})
        assert r.status_code == 422 and "no webhook of the template is shown so" in r.text
    r = client.post("/templates/_new", data={**form, "name": "copy"}, follow_redirects=False)
    assert r.status_code == 303 and stored_version(engine, "copy", 1).webhooks == [hooks["pets"]]


def test_field_errors_are_shown_beside_their_fields(client: TestClient, engine: Engine) -> None:
    r = created_template(
        client,
        **{
            **GOOD,
            "name": "Pets!",
            "model_id": "",
            "train_size": "0",
            "lora_dropout": "much",
            "gates.min_accuracy": "1.5",
            "gates.significance": "",
            "gates.min_class_support": "x",
            "webhooks": "https://ok.example.com/hook\nftp://nope",
        },
    )
    assert r.status_code == 422
    assert "lowercase letters, digits and ._- only" in (field_error(r.text, "name") or "")
    assert field_error(r.text, "model_id") == "⚠ is required"
    assert field_error(r.text, "train_size") == "⚠ must be between 1 and 1000000 (got '0')"
    assert "valid number" in (field_error(r.text, "lora_dropout") or "")
    assert field_error(r.text, "gates.min_accuracy") == "⚠ must be between 0 and 1 (got '1.5')"
    assert "valid number" in (field_error(r.text, "gates.significance") or "")
    assert "valid integer" in (field_error(r.text, "gates.min_class_support") or "")
    assert field_error(r.text, "webhooks") == "⚠ 'ftp://nope' is not an http:// or https:// URL"
    assert (
        field_error(r.text, "dataset") is None and field_error(r.text, "gates.min_macro_f1") is None
    )
    again = browser_form(r.text, "/templates/_new")  # what was typed comes back
    assert again["name"] == "Pets!" and again["gates.min_accuracy"] == "1.5"
    assert again["webhooks"] == "https://ok.example.com/hook\nftp://nope"
    assert again["gates.no_worse_than_champion"] == "on"

    for changes, field, status, words in [
        # The service's own refusals, at their fields: the GPU estimate, text no database
        # stores, a webhook with nothing to sign it, and a name that is taken.
        ({"model_id": "google/gemma-3-27b-it", "batch_size": "8"}, "gpu_type", 422, "GiB"),
        ({"description": "nul \x00 here"}, "description", 422, "NUL"),
        ({"webhooks": "https://ci.example.com/hook"}, "webhooks", 422, "TUNEPLANE_WEBHOOK_SECRET"),
    ]:
        r = created_template(client, **{**GOOD, **changes})
        assert r.status_code == status, (changes, r.status_code)
        assert words in (field_error(r.text, field) or ""), (changes, r.text[-2000:])
    with Session(engine) as session:
        assert session.exec(select(TemplateVersion)).all() == []

    assert created_template(client, **GOOD).status_code == 303
    taken = created_template(client, **GOOD)
    assert taken.status_code == 409 and "Template exists" in taken.text
    assert "exists" in (field_error(taken.text, "name") or "")


# ---- edit --------------------------------------------------------------------------------------


@pytest.fixture
def signing_client(make_settings: Callable[..., Settings], engine: Engine) -> Iterator[TestClient]:
    """A client of an app whose server signs webhooks (TUNEPLANE_WEBHOOK_SECRET)."""
    with TestClient(create_app(make_settings(webhook_secret=SECRET))) as c:
        yield c


def test_edit_saves_version_2_and_keeps_webhook_secrets(
    signing_client: TestClient, engine: Engine
) -> None:
    client = signing_client
    own = {"url": "https://own.example.com/hook/T0-credential", "secret": "x" * 20}
    shown = template_url(own["url"])  # a receiver's path is often its credential
    assert shown.startswith("https://own.example.com/…#k=")
    # No path: shown as `https://ci.example/#k=...`, and still its own secret, not the server's.
    bare = {"url": "https://ci.example", "secret": "y" * 20}
    webhooks = [own, bare]
    make_template(client, gates={"min_accuracy": 0.8}, webhooks=webhooks, auto_promote=True)
    page = client.get("/templates/pets/edit").text
    assert "Save as version 2" in page
    form = browser_form(page, "/templates/pets/edit")
    assert form["train_size"] == "100" and form["gates.min_accuracy"] == "0.8"
    assert form["auto_promote"] == "on"
    assert form["webhooks"] == f"{shown}\n{template_url(bare['url'])}"
    assert own["secret"] not in page and "T0-credential" not in page  # never shown
    assert "T0-credential" not in client.get("/templates/pets").text

    # The prefilled form, sent unchanged, reproduces the stored content: no new version.
    r = client.post("/templates/pets/edit", data=form, follow_redirects=False)
    assert r.headers["location"] == "/templates/pets?notice=template-unchanged"
    assert client.get("/api/v1/templates/pets").json()["version"] == 1

    # An error is shown on the edit form, and saves nothing.
    bad = client.post("/templates/pets/edit", data={**form, "gates.max_unknown_rate": "-1"})
    assert bad.status_code == 422 and "Save as version 2" in bad.text
    assert "between 0 and 1 (got '-1')" in (field_error(bad.text, "gates.max_unknown_rate") or "")

    new_hook = "https://new.example.com/hook"
    changed = {
        **form,
        "gates.min_accuracy": "0.85",
        "learning_rate": "0.0001",
        # The shown lines kept as they are (the bare one as a whole URL), one added.
        "webhooks": f"{shown}\nhttps://ci.example\n{new_hook}",
    }
    r = client.post("/templates/pets/edit", data=changed, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/templates/pets?notice=template-saved"
    t = client.get("/api/v1/templates/pets").json()
    assert t["version"] == 2 and t["gates"]["min_accuracy"] == 0.85
    assert t["spec"]["learning_rate"] == 1e-4 and t["auto_promote"] is True
    assert t["webhooks"] == [
        {"url": shown, "has_own_secret": True},
        {"url": template_url(bare["url"]), "has_own_secret": True},
        {"url": template_url(new_hook), "has_own_secret": False},  # the server's secret
    ]
    new = {"url": new_hook, "secret": None}
    assert stored_version(engine, "pets", 2).webhooks == [own, bare, new]
    v1 = stored_version(engine, "pets", 1)
    assert v1.gates["min_accuracy"] == 0.8 and v1.spec["learning_rate"] == 2e-4  # kept as it was
    page = client.get(r.headers["location"]).text
    assert "Saved as a new version" in page and "v2" in page
    assert client.get("/templates/nope/edit").status_code == 404


# ---- start a run, delete -----------------------------------------------------------------------


def test_start_a_run_from_the_template_page(client: TestClient, engine: Engine) -> None:
    make_template(client)
    page = client.get("/templates/pets").text
    form = browser_form(page, "/templates/pets/runs", tags="bad tag!")
    bad = client.post("/templates/pets/runs", data=form)
    assert bad.status_code == 422 and "bad tag!" in (field_error(bad.text, "tags") or "")
    assert 'value="bad tag!"' in bad.text

    form = browser_form(page, "/templates/pets/runs", run_name="by hand", tags="manual")
    r = client.post("/templates/pets/runs", data=form, follow_redirects=False)
    assert r.status_code == 303
    run_id = r.headers["location"].removeprefix("/runs/").removesuffix("?notice=created")
    # The same form sent again (a double click) is the same run.
    again = client.post("/templates/pets/runs", data=form, follow_redirects=False)
    assert again.headers["location"] == r.headers["location"]
    with Session(engine) as session:
        runs = session.exec(select(Run)).all()
        assert [r.id for r in runs] == [run_id]
        assert runs[0].name == "by hand" and runs[0].status == "queued"
        assert (runs[0].template_name, runs[0].template_version) == ("pets", 1)
    assert client.post("/templates/nope/runs", data=form).status_code == 404


def test_delete_needs_the_box_ticked_and_hides_the_template(
    client: TestClient, engine: Engine
) -> None:
    make_template(client)
    page = client.get("/templates/pets").text
    form = browser_form(page, "/templates/pets/delete")
    assert "confirm" not in form
    unticked = client.post("/templates/pets/delete", data=form)
    assert unticked.status_code == 400 and field_error(unticked.text, "confirm")
    assert client.get("/api/v1/templates/pets").status_code == 200

    r = client.post(
        "/templates/pets/delete", data={**form, "confirm": "yes"}, follow_redirects=False
    )
    assert r.status_code == 303 and r.headers["location"] == "/templates?notice=template-deleted"
    assert "Template deleted." in client.get(r.headers["location"]).text
    assert client.get("/templates/pets").status_code == 404
    assert client.get("/api/v1/templates/pets").status_code == 404
    assert stored_version(engine, "pets", 1).name == "pets"  # kept for the record


# ---- refusals ----------------------------------------------------------------------------------


def test_forms_without_a_valid_csrf_token_are_refused(
    client: TestClient, app: object, engine: Engine
) -> None:
    make_template(client)
    page = client.get("/templates/pets").text
    good = form_fields(page, "/templates/pets/runs")
    cookie = client.cookies.get("tuneplane_csrf")
    assert cookie
    content = browser_form(client.get("/templates/_new").text, "/templates/_new", **GOOD)
    posts = {
        "/templates/_new": content,
        "/templates/pets/edit": {**content, "gates.min_accuracy": "0.9"},
        "/templates/pets/delete": {"confirm": "yes"},
        "/templates/pets/runs": {},
    }
    attempts: list[tuple[dict[str, str], dict[str, str]]] = [
        ({}, {"tuneplane_csrf": cookie}),  # no token
        ({**good, "csrf_token": "f" * 64}, {"tuneplane_csrf": cookie}),  # wrong token
        (good, {}),  # no cookie (a cross-site POST under SameSite=Lax)
    ]
    for tokens, cookies in attempts:
        with TestClient(app, cookies=cookies) as other:  # type: ignore[arg-type]
            for path, data in posts.items():
                data = {k: v for k, v in data.items() if k not in ("csrf_token", "form_key")}
                r = other.post(path, data={**data, **tokens}, follow_redirects=False)
                assert r.status_code == 403, (path, tokens.keys(), cookies.keys())
                assert "Form expired or forged" in r.text
    t = client.get("/api/v1/templates/pets").json()
    assert t["version"] == 1 and t["gates"]["min_accuracy"] is None  # not edited, not deleted
    assert client.get("/api/v1/templates/pets-4b").status_code == 404  # not created
    with Session(engine) as session:
        assert session.exec(select(Run)).all() == []  # no run started


@pytest.fixture
def secured(make_settings: Callable[..., Settings]) -> Iterator[tuple[TestClient, dict[str, str]]]:
    """An app with auth on and two tokens: `read` (runs:read) and `write` (both scopes)."""
    settings = make_settings(auth_enabled=True)
    engine = make_engine(settings.db_url)
    migrate(engine)
    tokens = {}
    with session_scope(engine) as session:
        for name, scopes in {"read": ["runs:read"], "write": ["runs:read", "runs:write"]}.items():
            _, tokens[name] = create_token(session, TokenCreate(name=name, scopes=scopes))
    # https: the session cookie is Secure off loopback, and httpx keeps Secure cookies to https.
    with TestClient(create_app(settings), base_url="https://testserver") as client:
        yield client, tokens
    engine.dispose()


def log_in(client: TestClient, token: str) -> None:
    client.cookies.clear()
    fields = form_fields(client.get("/login").text)
    r = client.post("/login", data={**fields, "token": token}, follow_redirects=False)
    assert r.status_code == 303, r.text


def test_with_auth_on_only_a_runs_write_session_may_submit(
    secured: tuple[TestClient, dict[str, str]],
) -> None:
    client, tokens = secured
    log_in(client, tokens["write"])
    assert created_template(client, **GOOD).status_code == 303
    t = client.get("/api/v1/templates/pets-4b").json()
    assert t["version_created_by"] == "write"  # who made the version, as over REST

    log_in(client, tokens["read"])
    page = client.get("/templates/pets-4b").text  # reading is allowed
    edit = browser_form(client.get("/templates/pets-4b/edit").text, "/templates/pets-4b/edit")
    for path, data in {
        "/templates/_new": browser_form(
            client.get("/templates/_new").text, "/templates/_new", **{**GOOD, "name": "other"}
        ),
        "/templates/pets-4b/edit": {**edit, "gates.min_accuracy": "0.9"},
        "/templates/pets-4b/runs": browser_form(page, "/templates/pets-4b/runs"),
        "/templates/pets-4b/delete": {
            **browser_form(page, "/templates/pets-4b/delete"),
            "confirm": "yes",
        },
    }.items():
        r = client.post(path, data=data, follow_redirects=False)
        assert r.status_code == 303, path
        assert (
            r.headers["location"].startswith("/login?")
            and "why=scope-write" in r.headers["location"]
        )
    t = client.get("/api/v1/templates/pets-4b").json()
    assert t["version"] == 1 and t["gates"]["min_accuracy"] == 0.8
    assert client.get("/api/v1/templates/other").status_code == 404
    assert client.get("/api/v1/runs").json()["items"] == []
