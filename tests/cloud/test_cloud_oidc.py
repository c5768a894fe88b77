"""Google-signed OIDC ID tokens on callbacks: real RS256 tokens, certificates served over HTTP
by a local stand-in for https://www.googleapis.com/oauth2/v1/certs."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.config import Settings
from api.db import make_engine, migrate
from api.main import create_app
from api.oidc_auth import OidcRejected, looks_like_id_token, verify_callback
from tests.api.factories import insert_runs, token_for
from tests.cloud.conftest import TRAINER_SA, cloud_values
from tests.fakes.oidc import CertServer, SigningKey
from trainer import events as ev

PUBLIC_URL = "https://tuneplane-api-abc-uc.a.run.app"
EXECUTION = (
    "projects/tp-test/locations/us-central1/jobs/tuneplane-trainer-l4/executions/"
    "tuneplane-trainer-l4-x7k2p"
)


class Key(SigningKey):
    def token(self, audience: str = PUBLIC_URL, email: str = TRAINER_SA, **claims: Any) -> str:
        return super().token(audience, email, **claims)


@pytest.fixture(scope="module")
def keys() -> dict[str, Key]:
    return {"google-1": Key("google-1"), "google-2": Key("google-2"), "forger": Key("google-1")}


@pytest.fixture
def certs(keys: dict[str, Key]) -> Iterator[CertServer]:
    server = CertServer(keys["google-1"])
    yield server
    server.stop()


@pytest.fixture
def settings(tmp_path: Path, certs: CertServer) -> Settings:
    return Settings(
        **cloud_values(
            data_dir=tmp_path, public_url=PUBLIC_URL + "/", oidc_certs_url=certs.url,
            callback_auth="oidc",
        )
    )  # fmt: skip


def test_a_token_of_the_trainers_account_for_its_execution_passes(
    keys: dict[str, Key], settings: Settings
) -> None:
    token = keys["google-1"].token()
    assert looks_like_id_token(token)
    claims = verify_callback(token, "tuneplane-trainer-l4-x7k2p", EXECUTION, settings)
    assert claims["email"] == TRAINER_SA
    # The full name works as well as the short one Cloud Run gives the task.
    verify_callback(token, EXECUTION, EXECUTION, settings)


def test_certificates_are_cached_and_refetched_when_google_rotates_them(
    keys: dict[str, Key], settings: Settings, certs: CertServer
) -> None:
    for _ in range(5):
        verify_callback(keys["google-1"].token(), EXECUTION, EXECUTION, settings)
    assert certs.hits == 1

    certs.certs["google-2"] = keys["google-2"].cert_pem
    verify_callback(keys["google-2"].token(), EXECUTION, EXECUTION, settings)
    assert certs.hits == 2
    # An unknown key id again right away does not make every request hit Google.
    with pytest.raises(OidcRejected):
        verify_callback(Key("unknown").token(), EXECUTION, EXECUTION, settings)
    assert certs.hits == 2


@pytest.mark.parametrize(
    ("claims", "status", "message"),
    [
        ({"audience": "https://someone-else.example"}, 401, "audience"),
        ({"iss": "https://evil.example"}, 401, "is not Google"),
        ({"email": "someone@tp-test.iam.gserviceaccount.com"}, 403, "only the trainer's"),
        ({"email_verified": False}, 403, "only the trainer's"),
        ({"exp": int(time.time()) - 3600, "iat": int(time.time()) - 7200}, 401, "expired"),
    ],
)
def test_a_token_with_wrong_claims_is_refused(
    keys: dict[str, Key], settings: Settings, claims: dict[str, Any], status: int, message: str
) -> None:
    with pytest.raises(OidcRejected) as info:
        verify_callback(keys["google-1"].token(**claims), EXECUTION, EXECUTION, settings)
    assert info.value.status == status
    assert message in info.value.message


def test_a_forged_or_mangled_token_is_refused(keys: dict[str, Key], settings: Settings) -> None:
    forged = keys["forger"].token()  # same key id, another key
    with pytest.raises(OidcRejected, match="signature") as info:
        verify_callback(forged, EXECUTION, EXECUTION, settings)
    assert info.value.status == 401
    head, body, _sig = keys["google-1"].token().split(".")
    with pytest.raises(OidcRejected):
        verify_callback(f"{head}.{body}.", EXECUTION, EXECUTION, settings)


def test_the_token_is_bound_to_the_runs_execution(keys: dict[str, Key], settings: Settings) -> None:
    token = keys["google-1"].token()
    with pytest.raises(OidcRejected, match="does not serve this run") as info:
        verify_callback(token, "tuneplane-trainer-l4-other", EXECUTION, settings)
    assert info.value.status == 403
    with pytest.raises(OidcRejected, match="must name its execution") as info:
        verify_callback(token, None, EXECUTION, settings)
    assert info.value.status == 401
    with pytest.raises(OidcRejected, match="no Cloud Run execution") as info:
        verify_callback(token, EXECUTION, None, settings)
    assert info.value.status == 403


def test_hmac_tokens_are_not_taken_for_id_tokens() -> None:
    assert not looks_like_id_token("run_abc.1767225600.3f9a0c")
    assert not looks_like_id_token("not-a-token")


def test_the_callback_route_takes_id_tokens_bound_to_the_runs_execution(
    keys: dict[str, Key], certs: CertServer, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(
        **cloud_values(public_url=PUBLIC_URL, oidc_certs_url=certs.url, callback_auth="oidc")
    )
    engine = make_engine(settings.db_url)
    migrate(engine)
    (run_id,) = insert_runs(engine, execution_name=EXECUTION)
    (other,) = insert_runs(engine, execution_name=EXECUTION.replace("x7k2p", "other"))
    token = keys["google-1"].token()

    def post(run: str, auth: str, execution: str | None = "tuneplane-trainer-l4-x7k2p") -> Any:
        event = ev.StartedEvent(run_id=run, seq=0, data=ev.Started())
        headers = {"Authorization": f"Bearer {auth}", "Content-Type": "application/json"}
        if execution:
            headers["X-Tuneplane-Execution"] = execution
        return client.post(
            f"/api/v1/runs/{run}/events", content=event.model_dump_json(), headers=headers
        )

    with TestClient(create_app(settings)) as client:
        assert post(run_id, token).status_code == 201
        refused = post(other, token)  # a genuine token, but that execution serves another run
        assert refused.status_code == 403 and "does not serve this run" in refused.json()["detail"]
        assert post(run_id, token, execution=None).status_code == 401
        assert post(run_id, keys["forger"].token()).status_code == 401
        stranger = keys["google-1"].token(email="someone@tp-test.iam.gserviceaccount.com")
        assert post(run_id, stranger).status_code == 403
        # The per-run HMAC token keeps working (runs dispatched before the switch to oidc).
        assert post(other, token_for(settings, other), execution=None).status_code == 201
    engine.dispose()
