"""A run's artifacts (`run_artifacts`, for GET /api/v1/runs/{id}/artifacts and the run's page),
and their download links: a V4 signed URL for a file in Cloud Storage where the api's
credentials can sign one, else none (the API and dashboard then show the `gs://` URI alone).

Credentials that can sign: a service-account key (signs locally), or a service account on
Cloud Run / GCE (signs through the IAM Credentials API; the account needs
`roles/iam.serviceAccountTokenCreator` on itself). User credentials and anonymous ones cannot.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from typing import Any

import google.auth
from google.auth import credentials as gcreds
from google.auth import exceptions as gauth_exc
from google.auth.transport.requests import Request
from google.cloud import storage  # type: ignore[attr-defined,unused-ignore]
from pydantic import BaseModel, Field
from sqlmodel import Session, col, select

from api.config import Settings
from api.events.models import RunEvent
from api.runs.query import find_run

log = logging.getLogger(__name__)

# Artifacts that are one file (the others, adapter and processor, are directories).
FILE_KINDS = frozenset({"results", "log"})


class ArtifactOut(BaseModel):
    kind: str
    uri: str
    download_url: str | None = Field(
        description="a time-limited signed URL (files in Cloud Storage, when the api's "
        "credentials can sign); null otherwise"
    )


class RunArtifacts(BaseModel):
    run_id: str
    artifact_uri: str | None = Field(description="the run's output prefix (gs://... or a path)")
    artifacts: list[ArtifactOut]


_lock = threading.Lock()
_credentials: list[Any] = []  # [credentials or None], looked up once: it may probe metadata
_warned = False


def _default_credentials() -> gcreds.Credentials | None:
    with _lock:
        if not _credentials:
            try:
                found, _ = google.auth.default(
                    scopes=["https://www.googleapis.com/auth/cloud-platform"]
                )
            except gauth_exc.DefaultCredentialsError:
                found = None
            _credentials.append(found)
        creds: gcreds.Credentials | None = _credentials[0]
        return creds


def reset_credentials_cache() -> None:
    """Look the credentials up again on the next call (tests change them)."""
    with _lock:
        _credentials.clear()


def split_gs_uri(uri: str) -> tuple[str, str] | None:
    if not uri.startswith("gs://"):
        return None
    bucket, _, path = uri.removeprefix("gs://").partition("/")
    return (bucket, path) if bucket and path else None


def download_url(uri: str | None, settings: Settings) -> str | None:
    """A signed GET URL for one object, valid `signed_url_minutes`; None for anything that is
    not a `gs://` object (a local path, a prefix) or when the credentials cannot sign."""
    global _warned
    parts = split_gs_uri(uri or "")
    if parts is None or parts[1].endswith("/"):
        return None
    creds = _default_credentials()
    if creds is None:
        return None
    bucket, path = parts
    client = storage.Client(project=settings.gcp_project or "none", credentials=creds)
    blob = client.bucket(bucket).blob(path)
    expiration = timedelta(minutes=settings.signed_url_minutes)
    try:
        if isinstance(creds, gcreds.Signing):
            url: str = blob.generate_signed_url(
                version="v4", expiration=expiration, method="GET", credentials=creds
            )
            return url
        email = getattr(creds, "service_account_email", None)
        if email is None:
            return None  # user credentials: nothing to sign with
        if email == "default" or not creds.valid:
            # A metadata-server account (Cloud Run, GCE) learns its email on refresh and signs
            # through the IAM Credentials API.
            creds.refresh(Request())
            email = getattr(creds, "service_account_email", None)
        url = blob.generate_signed_url(
            version="v4",
            expiration=expiration,
            method="GET",
            service_account_email=email,
            access_token=creds.token,
        )
        return url
    except Exception as err:  # a missing link must never break the page that shows it
        if not _warned:
            log.warning("artifact links will have no signed URL: %s", err)
            _warned = True
        return None


def run_artifacts(session: Session, settings: Settings, run_id: str) -> RunArtifacts:
    """The newest report of each kind of artifact of the run (404 for an unknown run)."""
    run = find_run(session, run_id)
    rows = session.exec(
        select(RunEvent)
        .where(RunEvent.run_id == run_id, RunEvent.type == "artifact")
        .order_by(col(RunEvent.time))
    ).all()
    latest: dict[str, str] = {}
    for row in rows:  # a later segment's or attempt's report wins
        latest[str(row.data["kind"])] = str(row.data["uri"])
    return RunArtifacts(
        run_id=run_id,
        artifact_uri=run.artifact_uri,
        artifacts=[
            ArtifactOut(
                kind=kind,
                uri=uri,
                download_url=download_url(uri, settings) if kind in FILE_KINDS else None,
            )
            for kind, uri in sorted(latest.items())
        ],
    )
