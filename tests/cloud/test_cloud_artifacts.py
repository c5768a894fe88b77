"""Signed download URLs of artifacts, against the Cloud Storage emulator."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi.testclient import TestClient
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from api.config import Settings
from api.db import make_engine, migrate
from api.main import create_app
from api.runs import artifacts
from tests.api.factories import insert_runs, token_for
from tests.cloud.conftest import PROJECT, cloud_values
from tests.fakes.gcs import FakeGcs
from trainer.contract import events as ev

SA = f"tuneplane-api@{PROJECT}.iam.gserviceaccount.com"


@pytest.fixture
def bucket(gcs_env: FakeGcs, request: pytest.FixtureRequest) -> str:
    name = f"tp-art-{abs(hash(request.node.nodeid)) % 10**8}"
    gcs_env.create_bucket(name)
    client = storage.Client(project=PROJECT, credentials=AnonymousCredentials())
    client.bucket(name).blob("runs/run_1/results.json").upload_from_string(b'{"accuracy": 0.9}')
    return name


def settings(tmp_path: Path) -> Settings:
    return Settings(**cloud_values(data_dir=tmp_path, signed_url_minutes=15))


def service_account_key(tmp_path: Path) -> Path:
    """A service-account key file (what `gcloud iam service-accounts keys create` writes)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    key_file = tmp_path / "sa.json"
    key_file.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": PROJECT,
                "private_key_id": "k1",
                "private_key": pem,
                "client_email": SA,
                "client_id": "1",
                "token_uri": "https://oauth2.googleapis.com/token",
            }
        )
    )
    return key_file


def test_a_service_account_key_signs_a_url_that_downloads_the_object(
    tmp_path: Path, bucket: str, monkeypatch: pytest.MonkeyPatch, fresh_credentials: None
) -> None:
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(service_account_key(tmp_path)))
    url = artifacts.download_url(f"gs://{bucket}/runs/run_1/results.json", settings(tmp_path))
    assert url is not None
    assert "X-Goog-Signature=" in url and "X-Goog-Expires=900" in url
    assert "tuneplane-api%40tp-test.iam.gserviceaccount.com" in url
    response = httpx.get(url)
    assert response.status_code == 200 and response.json() == {"accuracy": 0.9}


def test_the_artifacts_endpoint_lists_uris_and_signed_urls(
    tmp_path: Path,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    fresh_credentials: None,
    make_settings: Callable[..., Settings],
) -> None:
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(service_account_key(tmp_path)))
    s = make_settings(**cloud_values(bucket=bucket))
    engine = make_engine(s.db_url)
    migrate(engine)
    prefix = f"gs://{bucket}/runs/run_1"
    (run_id,) = insert_runs(engine, artifact_uri=prefix)
    with TestClient(create_app(s)) as client:
        for seq, (kind, uri) in enumerate(
            [("adapter", f"{prefix}/adapter"), ("results", f"{prefix}/results.json")]
        ):
            event = ev.ArtifactEvent(run_id=run_id, seq=seq, data=ev.Artifact(kind=kind, uri=uri))
            posted = client.post(
                f"/api/v1/runs/{run_id}/events",
                content=event.model_dump_json(),
                headers={"Authorization": f"Bearer {token_for(s, run_id)}"},
            )
            assert posted.status_code == 201, posted.text
        body = client.get(f"/api/v1/runs/{run_id}/artifacts").json()
        assert client.get("/api/v1/runs/run_nope/artifacts").status_code == 404
    engine.dispose()
    assert body["artifact_uri"] == prefix
    adapter, results = body["artifacts"]
    assert adapter == {"kind": "adapter", "uri": f"{prefix}/adapter", "download_url": None}
    assert results["uri"] == f"{prefix}/results.json"
    assert httpx.get(results["download_url"]).json() == {"accuracy": 0.9}


def test_without_signing_credentials_there_is_no_url(
    tmp_path: Path, bucket: str, monkeypatch: pytest.MonkeyPatch, fresh_credentials: None
) -> None:
    # Authorized-user credentials (what `gcloud auth application-default login` writes) cannot
    # sign; neither can no credentials at all.
    user = tmp_path / "user.json"
    user.write_text(
        json.dumps(
            {
                "type": "authorized_user",
                "client_id": "id",
                "client_secret": "secret",
                "refresh_token": "token",
            }
        )
    )
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(user))
    assert (
        artifacts.download_url(f"gs://{bucket}/runs/run_1/results.json", settings(tmp_path)) is None
    )


@pytest.mark.parametrize(
    "uri", [None, "", "/data/runs/run_1/results.json", "gs://bucket-only", "gs://b/runs/run_1/"]
)
def test_no_url_for_what_is_not_one_object_in_cloud_storage(
    tmp_path: Path, uri: str | None
) -> None:
    assert artifacts.download_url(uri, settings(tmp_path)) is None
