"""Settings that name Secret Manager secrets, resolved through the real client against a fake
Secret Manager server."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from api.config import Settings
from api.main import create_app
from api.secrets import SecretReferenceError, references, resolve_secrets
from tests.cloud.conftest import cloud_values
from tests.fakes.secretmanager import FakeSecretManager

SECRETS = "projects/tp-test/secrets"


def settings(tmp_path: Path, fake: FakeSecretManager, **overrides: object) -> Settings:
    return Settings(
        **cloud_values(data_dir=tmp_path, secret_manager_endpoint=fake.endpoint, **overrides)
    )


def test_references_are_replaced_by_the_secrets_values(
    tmp_path: Path, fake_secret_manager: FakeSecretManager
) -> None:
    fake_secret_manager.add(f"{SECRETS}/signing-key", "old-key")
    fake_secret_manager.add(f"{SECRETS}/signing-key", "new-key\n")  # as `echo ... |` stores it
    fake_secret_manager.add(f"{SECRETS}/db-url", f"sqlite:///{tmp_path}/from-secret.db")
    s = settings(
        tmp_path,
        fake_secret_manager,
        callback_signing_key=f"sm://{SECRETS}/signing-key",
        database_url=f"sm://{SECRETS}/db-url/versions/1",
    )
    assert set(references(s)) == {"callback_signing_key", "database_url"}

    resolved = resolve_secrets(s)
    assert resolved.callback_signing_key is not None
    assert resolved.callback_signing_key.get_secret_value() == "new-key"  # latest, no newline
    assert resolved.signing_key == b"new-key"
    assert resolved.database_url == f"sqlite:///{tmp_path}/from-secret.db"
    assert resolved.gcp_project == s.gcp_project
    names = [r.name for r in fake_secret_manager.calls("AccessSecretVersion")]
    assert sorted(names) == [
        f"{SECRETS}/db-url/versions/1",
        f"{SECRETS}/signing-key/versions/latest",
    ]
    assert references(resolved) == {}


def test_no_reference_no_client(tmp_path: Path, fake_secret_manager: FakeSecretManager) -> None:
    s = settings(tmp_path, fake_secret_manager)
    assert resolve_secrets(s) is s
    assert fake_secret_manager.requests == []


def test_the_app_resolves_references_at_start_up(
    tmp_path: Path, fake_secret_manager: FakeSecretManager
) -> None:
    fake_secret_manager.add(f"{SECRETS}/signing-key", "key-from-secret-manager")
    app = create_app(
        settings(tmp_path, fake_secret_manager, callback_signing_key=f"sm://{SECRETS}/signing-key")
    )
    assert app.state.settings.signing_key == b"key-from-secret-manager"


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        (f"sm://{SECRETS}/missing", "create the secret"),
        (f"sm://{SECRETS}/signing-key/versions/9", "create the secret (or the version)"),
        ("sm://signing-key", "is not a Secret Manager reference"),
        (f"sm://{SECRETS}/a/b/c", "is not a Secret Manager reference"),
    ],
)
def test_a_reference_that_cannot_be_read_stops_the_start(
    tmp_path: Path, fake_secret_manager: FakeSecretManager, reference: str, message: str
) -> None:
    fake_secret_manager.add(f"{SECRETS}/signing-key", "v1")
    s = settings(tmp_path, fake_secret_manager, callback_signing_key=reference)
    with pytest.raises(SecretReferenceError, match="TUNEPLANE_CALLBACK_SIGNING_KEY") as info:
        resolve_secrets(s)
    assert message in str(info.value)


def test_permission_denied_names_the_role_to_grant(
    tmp_path: Path, fake_secret_manager: FakeSecretManager
) -> None:
    fake_secret_manager.fail("AccessSecretVersion", grpc.StatusCode.PERMISSION_DENIED, "denied")
    s = settings(tmp_path, fake_secret_manager, callback_signing_key=f"sm://{SECRETS}/k")
    with pytest.raises(SecretReferenceError, match=r"roles/secretmanager\.secretAccessor"):
        resolve_secrets(s)


def test_a_corrupted_payload_is_refused(
    tmp_path: Path, fake_secret_manager: FakeSecretManager
) -> None:
    fake_secret_manager.add(f"{SECRETS}/k", "value")
    fake_secret_manager.corrupt = True
    s = settings(tmp_path, fake_secret_manager, callback_signing_key=f"sm://{SECRETS}/k")
    with pytest.raises(SecretReferenceError, match="checksum"):
        resolve_secrets(s)
