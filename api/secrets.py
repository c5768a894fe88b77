"""Settings that point at Secret Manager: `TUNEPLANE_X=sm://projects/P/secrets/S[/versions/V]`.

The api's own secrets (the callback signing key, a database URL with its password, ...) need
not sit in the service's environment, where anyone who can view the Cloud Run service reads
them: a setting may name a Secret Manager secret instead, and `resolve_secrets` swaps in its
value once, at start-up, before anything uses it. A reference that cannot be read stops the
start with a message that says which setting, which secret and what to fix.
"""

from __future__ import annotations

import re
from typing import Any

import google_crc32c
import grpc
from google.api_core import exceptions as gexc
from google.auth.credentials import AnonymousCredentials
from google.cloud import secretmanager_v1
from google.cloud.secretmanager_v1.services.secret_manager_service.transports import (
    SecretManagerServiceGrpcTransport,
)
from pydantic import SecretStr

from api.config import Settings

PREFIX = "sm://"
_REF = re.compile(
    r"^sm://projects/([^/]+)/secrets/([A-Za-z0-9_-]+)(?:/versions/([A-Za-z0-9_-]+))?$"
)


class SecretReferenceError(RuntimeError):
    """A `sm://` setting that is malformed or cannot be read; the message says what to fix."""


def references(settings: Settings) -> dict[str, str]:
    """{field: "sm://..."} for every setting whose value is a Secret Manager reference."""
    found = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, str) and value.startswith(PREFIX):
            found[name] = value
    return found


def version_name(reference: str, setting: str = "") -> str:
    """`sm://projects/P/secrets/S[/versions/V]` -> `projects/P/secrets/S/versions/V|latest`."""
    match = _REF.match(reference)
    if not match:
        raise SecretReferenceError(
            f"{_env(setting)}={reference!r} is not a Secret Manager reference: write "
            "sm://projects/PROJECT/secrets/NAME or sm://projects/PROJECT/secrets/NAME/versions/N"
        )
    project, secret, version = match.groups()
    return f"projects/{project}/secrets/{secret}/versions/{version or 'latest'}"


def make_client(settings: Settings) -> secretmanager_v1.SecretManagerServiceClient:
    if settings.secret_manager_endpoint:
        transport = SecretManagerServiceGrpcTransport(
            channel=grpc.insecure_channel(settings.secret_manager_endpoint),
            credentials=AnonymousCredentials(),
        )
        return secretmanager_v1.SecretManagerServiceClient(transport=transport)
    return secretmanager_v1.SecretManagerServiceClient()


def resolve_secrets(settings: Settings) -> Settings:
    """Settings with every `sm://` reference replaced by the secret's value (the same object
    when there is none, so the embedded mode never builds a client)."""
    refs = references(settings)
    if not refs:
        return settings
    names = {field: version_name(ref, field) for field, ref in refs.items()}
    client = make_client(settings)
    try:
        values: dict[str, Any] = settings.model_dump()
        for field, name in names.items():
            text = _access(client, name, field)
            values[field] = SecretStr(text) if isinstance(values[field], SecretStr) else text
    finally:
        client.transport.close()
    # Validated again: a resolved value must pass the same checks as one written in the env.
    return type(settings).model_validate(values)


def _access(client: secretmanager_v1.SecretManagerServiceClient, name: str, field: str) -> str:
    try:
        response = client.access_secret_version(name=name, timeout=30)
    except gexc.GoogleAPICallError as err:
        hints: dict[type[gexc.GoogleAPICallError], str] = {
            gexc.PermissionDenied: "grant the api's service account "
            "roles/secretmanager.secretAccessor on that secret",
            gexc.NotFound: "create the secret (or the version), or fix the reference",
            gexc.Unauthenticated: "the api has no valid Google credentials",
        }
        hint = hints.get(type(err), "try again; Secret Manager may be unavailable")
        raise SecretReferenceError(
            f"{_env(field)} refers to {name}, which Secret Manager did not give: "
            f"{err.message}. To fix: {hint}."
        ) from err
    data: bytes = response.payload.data
    if "data_crc32c" in response.payload and google_crc32c.value(data) != (
        response.payload.data_crc32c
    ):
        raise SecretReferenceError(f"{_env(field)}: {name} arrived corrupted (checksum mismatch)")
    try:
        # `echo value | gcloud secrets create --data-file=-` stores a trailing newline.
        return data.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as err:
        raise SecretReferenceError(f"{_env(field)}: {name} is not UTF-8 text") from err


def _env(field: str) -> str:
    return f"TUNEPLANE_{field.upper()}" if field else "the setting"
