"""The run page's artifact links, against the Cloud Storage emulator: the dashboard shows a
signed download link for each file the REST endpoint can sign, the link downloads the real
bytes, and where nothing can be signed (folders, user credentials, local paths) the page shows
the URI as text, as `GET /api/v1/runs/{id}/artifacts` gives no URL there either."""

from __future__ import annotations

import html
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from api.config import Settings
from api.db import make_engine, migrate
from api.main import create_app
from tests.api.factories import insert_runs, token_for
from tests.cloud.conftest import PROJECT, cloud_values
from tests.cloud.test_cloud_artifacts import service_account_key
from tests.fakes.gcs import FakeGcs
from trainer.contract import events as ev

RESULTS = b'{"accuracy": 0.93, "macro_f1": 0.91}'
LOG = b"step 1 loss 2.5\nstep 2 loss 2.1 & <done>\n"


@pytest.fixture
def bucket(gcs_env: FakeGcs, request: pytest.FixtureRequest) -> str:
    name = f"tp-dash-{abs(hash(request.node.nodeid)) % 10**8}"
    gcs_env.create_bucket(name)
    client = storage.Client(project=PROJECT, credentials=AnonymousCredentials())
    client.bucket(name).blob("runs/r/results.json").upload_from_string(RESULTS)
    client.bucket(name).blob("runs/r/trainer.log").upload_from_string(LOG)
    return name


def run_page(
    settings: Settings, reported: list[tuple[str, str]], prefix: str
) -> tuple[str, dict[str, Any]]:
    """Post the trainer's artifact events for a run, then fetch its page and the REST listing."""
    engine = make_engine(settings.db_url)
    migrate(engine)
    (run_id,) = insert_runs(engine, artifact_uri=prefix)
    try:
        with TestClient(create_app(settings)) as client:
            for seq, (kind, uri) in enumerate(reported):
                event = ev.ArtifactEvent(
                    run_id=run_id,
                    seq=seq,
                    data=ev.Artifact(kind=kind, uri=uri),  # type: ignore[arg-type]
                )
                posted = client.post(
                    f"/api/v1/runs/{run_id}/events",
                    content=event.model_dump_json(),
                    headers={"Authorization": f"Bearer {token_for(settings, run_id)}"},
                )
                assert posted.status_code == 201, posted.text
            page = client.get(f"/runs/{run_id}")
            assert page.status_code == 200
            listing = client.get(f"/api/v1/runs/{run_id}/artifacts").json()
    finally:
        engine.dispose()
    return page.text, listing


def links(page: str) -> dict[str, str]:
    """{kind: href} of the page's artifact download links."""
    found = re.findall(r'<a href="([^"]+)" rel="noopener noreferrer" data-artifact="(\w+)">', page)
    return {kind: html.unescape(href) for href, kind in found}


def shown_as_text(page: str) -> dict[str, str]:
    """{kind: URI} of the artifacts the page shows without a link."""
    found = re.findall(
        r'<code class="wrap artifact-uri" data-artifact="(\w+)">([^<]*)</code>', page
    )
    return {kind: html.unescape(uri) for kind, uri in found}


def test_the_run_page_links_each_signable_file_and_the_link_downloads_it(
    tmp_path: Path,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    fresh_credentials: None,
    make_settings: Callable[..., Settings],
) -> None:
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(service_account_key(tmp_path)))
    prefix = f"gs://{bucket}/runs/r"
    reported = [
        ("adapter", f"{prefix}/adapter"),
        ("results", f"{prefix}/results.json"),
        ("log", f"{prefix}/trainer.log"),
    ]
    settings = make_settings(**cloud_values(bucket=bucket, signed_url_minutes=20))
    page, listing = run_page(settings, reported, prefix)
    hrefs = links(page)
    # Exactly the files the REST endpoint signs get a link; the adapter (a folder) is text.
    signed = {a["kind"] for a in listing["artifacts"] if a["download_url"]}
    assert set(hrefs) == signed == {"results", "log"}
    assert shown_as_text(page) == {"adapter": f"{prefix}/adapter"}
    assert "signed link, valid 20 min" in page
    for kind, body in (("results", RESULTS), ("log", LOG)):
        assert "X-Goog-Signature=" in hrefs[kind] and "X-Goog-Expires=1200" in hrefs[kind]
        response = httpx.get(hrefs[kind])
        assert response.status_code == 200 and response.content == body, kind


def test_without_signing_credentials_the_page_shows_uris_and_says_why(
    tmp_path: Path,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    fresh_credentials: None,
    make_settings: Callable[..., Settings],
) -> None:
    user = tmp_path / "user.json"  # what `gcloud auth application-default login` writes
    user.write_text(
        json.dumps(
            {
                "type": "authorized_user",
                "client_id": "i",
                "client_secret": "s",
                "refresh_token": "t",
            }
        )
    )
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(user))
    prefix = f"gs://{bucket}/runs/r"
    reported = [("results", f"{prefix}/results.json"), ("log", f"{prefix}/trainer.log")]
    page, listing = run_page(make_settings(**cloud_values(bucket=bucket)), reported, prefix)
    assert [a["download_url"] for a in listing["artifacts"]] == [None, None]
    assert links(page) == {}
    assert shown_as_text(page) == dict(reported)
    assert "credentials cannot sign Cloud Storage URLs" in page


def test_local_artifacts_are_shown_as_paths_as_the_api_lists_them(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    out = tmp_path / "data" / "artifacts" / "r"
    reported = [("adapter", str(out / "adapter")), ("results", str(out / "results.json"))]
    page, listing = run_page(make_settings(), reported, str(out))
    assert [a["download_url"] for a in listing["artifacts"]] == [None, None]
    assert links(page) == {}
    assert shown_as_text(page) == dict(reported)
    assert "cannot sign" not in page
