"""Google-signed OIDC ID tokens on callbacks: real RS256 tokens, certificates served over HTTP
by a local stand-in for https://www.googleapis.com/oauth2/v1/certs."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from api.auth.oidc import OidcRejected, looks_like_id_token, verify_callback
from api.config import Settings
from api.db import make_engine, migrate
from api.dispatch.base import Dispatcher, Execution, ExecutionStatus, Launch
from api.dispatch.cloudrun import CloudRunDispatcher
from api.dispatch.service import RetryPolicy
from api.dispatch.worker import Worker
from api.main import create_app
from api.runs.states import RunStatus
from tests.api.factories import insert_runs, token_for
from tests.cloud.conftest import TRAINER_SA, cloud_values
from tests.fakes.cloudrun import FakeCloudRun, FakeExecution, Outcome
from tests.fakes.oidc import CertServer, SigningKey
from trainer.contract import events as ev

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


def serving(fake: FakeCloudRun, run_id: str, name: str = EXECUTION) -> FakeExecution:
    """A live execution in the fake Cloud Run whose environment says it runs `run_id`."""
    return fake.seed_execution(name, {"TUNEPLANE_RUN_ID": run_id})


def test_the_callback_route_takes_id_tokens_bound_to_the_runs_execution(
    keys: dict[str, Key],
    certs: CertServer,
    fake_cloudrun: FakeCloudRun,
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(
        **cloud_values(
            public_url=PUBLIC_URL, oidc_certs_url=certs.url, callback_auth="oidc",
            cloud_run_endpoint=fake_cloudrun.endpoint,
        )
    )  # fmt: skip
    engine = make_engine(settings.db_url)
    migrate(engine)
    (run_id,) = insert_runs(engine, execution_name=EXECUTION)
    other_name = EXECUTION.replace("x7k2p", "other")
    (other,) = insert_runs(engine, execution_name=other_name)
    serving(fake_cloudrun, run_id)
    serving(fake_cloudrun, other, other_name)
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
        assert "other" not in refused.text and "x7k2p" not in refused.text  # names nothing
        assert post(run_id, token, execution=None).status_code == 401
        assert post(run_id, keys["forger"].token()).status_code == 401
        stranger = keys["google-1"].token(email="someone@tp-test.iam.gserviceaccount.com")
        assert post(run_id, stranger).status_code == 403
        # The per-run HMAC token keeps working (runs dispatched before the switch to oidc).
        assert post(other, token_for(settings, other), execution=None).status_code == 201

        # The header alone is not trusted: Cloud Run must say the execution runs this run...
        lying = "tuneplane-trainer-l4-lying"
        (claimed,) = insert_runs(engine, execution_name=EXECUTION.replace("x7k2p", "lying"))
        serving(fake_cloudrun, "run_someone_else", EXECUTION.replace("x7k2p", "lying"))
        refused = post(claimed, token, execution=lying)
        assert refused.status_code == 403 and "lying" not in refused.text
        # ...and is still running: an ended execution posts nothing more.
        done = EXECUTION.replace("x7k2p", "ended")
        (finished,) = insert_runs(engine, execution_name=done)
        serving(fake_cloudrun, finished, done)
        fake_cloudrun.start_attempt(done)
        fake_cloudrun.end_attempt(done, 0)
        assert post(finished, token, execution="tuneplane-trainer-l4-ended").status_code == 403
        # Not one of our Jobs' executions at all.
        foreign = "projects/tp-test/locations/us-central1/jobs/another-job/executions/another-job-a"
        (stray,) = insert_runs(engine, execution_name=foreign)
        assert post(stray, token, execution="another-job-a").status_code == 403
    engine.dispose()


# -- transient failures: answered 503 with Retry-After, which the trainer retries --------------
# (trainer/report_http.py retries 429 and 5xx and drops other 4xx; on Cloud Run its spool file
# dies with the container, so a refusal that is not the token's fault must never be a 4xx.)


def serve_again(server: CertServer) -> None:
    """Start a stopped certificate server again on its port (the api's settings name its URL)."""
    port = server.httpd.server_address[1]
    server.httpd = ThreadingHTTPServer(("127.0.0.1", port), server.httpd.RequestHandlerClass)
    threading.Thread(target=server.httpd.serve_forever, daemon=True).start()


def fresh_url(certs: CertServer) -> str:
    """The server's URL as a certificate cache of its own (caches are per URL, per process)."""
    return f"{certs.url}?test={uuid.uuid4().hex}"


def post_event(
    client: TestClient, run_id: str, event: ev.Event, token: str, execution: str
) -> httpx.Response:
    headers = {
        "Authorization": f"Bearer {token}",
        "Content-Type": "application/json",
        "X-Tuneplane-Execution": execution,
    }
    return client.post(
        f"/api/v1/runs/{run_id}/events", content=event.model_dump_json(), headers=headers
    )


def assert_retry_later(response: httpx.Response, words: str) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert int(response.headers["retry-after"]) > 0
    assert words in response.json()["detail"]


def test_unreachable_certificates_answer_503_and_the_retried_event_is_taken(
    keys: dict[str, Key],
    certs: CertServer,
    fake_cloudrun: FakeCloudRun,
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(
        **cloud_values(
            public_url=PUBLIC_URL, oidc_certs_url=fresh_url(certs), callback_auth="oidc",
            cloud_run_endpoint=fake_cloudrun.endpoint,
        )
    )  # fmt: skip
    engine = make_engine(settings.db_url)
    migrate(engine)
    (run_id,) = insert_runs(engine, execution_name=EXECUTION)
    serving(fake_cloudrun, run_id)
    event = ev.StartedEvent(run_id=run_id, seq=0, data=ev.Started())
    token = keys["google-1"].token()
    with TestClient(create_app(settings)) as client:
        certs.stop()  # Google's certificate endpoint out of reach (connection refused)
        early = post_event(client, run_id, event, token, "tuneplane-trainer-l4-x7k2p")
        assert_retry_later(early, "certificates")
        serve_again(certs)
        taken = post_event(client, run_id, event, token, "tuneplane-trainer-l4-x7k2p")
        assert taken.status_code == 201, taken.text
        assert taken.json()["run_status"] == "running"
    engine.dispose()


class FailingCertServer(CertServer):
    """Google's certificate endpoint answering 5xx while `failing`."""

    failing = False

    def answer(self, request: BaseHTTPRequestHandler) -> tuple[int, dict[str, str], bytes]:
        if self.failing:
            return 502, {"content-type": "text/html"}, b"<html>Bad Gateway</html>"
        return super().answer(request)


def test_certificates_failing_during_a_key_rotation_are_transient_not_a_refusal(
    keys: dict[str, Key],
) -> None:
    server = FailingCertServer(keys["google-1"])
    try:
        settings = Settings(
            **cloud_values(
                public_url=PUBLIC_URL, oidc_certs_url=fresh_url(server), callback_auth="oidc"
            )
        )
        server.failing = True
        with pytest.raises(OidcRejected, match="certificates") as info:
            verify_callback(keys["google-1"].token(), EXECUTION, EXECUTION, settings)
        assert info.value.status == 503 and info.value.retry_after

        server.failing = False
        verify_callback(keys["google-1"].token(), EXECUTION, EXECUTION, settings)
        # Google rotates to a new key while its endpoint fails: the cached certificates cannot
        # check the new key id, which says nothing against the token. Each retry asks again.
        server.failing = True
        for _ in range(2):
            with pytest.raises(OidcRejected) as info:
                verify_callback(keys["google-2"].token(), EXECUTION, EXECUTION, settings)
            assert info.value.status == 503
        verify_callback(keys["google-1"].token(), EXECUTION, EXECUTION, settings)  # cached
        server.failing = False
        server.certs["google-2"] = keys["google-2"].cert_pem
        verify_callback(keys["google-2"].token(), EXECUTION, EXECUTION, settings)
    finally:
        server.stop()


class TrainerFasterThanTheRecord:
    """The real CloudRunDispatcher, with the trainer posting the moment Cloud Run has started
    its execution: before the worker has stored the execution's name."""

    def __init__(self, inner: Dispatcher, trainer_posts: Callable[[Execution], None]) -> None:
        self.inner, self.trainer_posts = inner, trainer_posts

    def start(self, launch: Launch) -> Execution:
        execution = self.inner.start(launch)
        self.trainer_posts(execution)
        return execution

    def cancel(self, execution_name: str) -> None:
        self.inner.cancel(execution_name)

    def status(self, execution_name: str) -> ExecutionStatus:
        return self.inner.status(execution_name)

    def close(self) -> None:
        self.inner.close()


@pytest.mark.parametrize("segment", [0, 1])
def test_a_trainer_faster_than_the_dispatch_record_is_told_to_retry_not_refused(
    keys: dict[str, Key],
    certs: CertServer,
    fake_cloudrun: FakeCloudRun,
    make_settings: Callable[..., Settings],
    segment: int,
) -> None:
    """OIDC twin of tests/api/dispatch/test_worker.py's token-mode test of the same race: the token
    cannot be bound to the run before its execution is stored, so the answer is 503 (retried
    by the trainer), never 403 (dropped). Segment 1: the previous segment's execution is still
    the stored one."""
    settings = make_settings(
        **cloud_values(
            cloud_run_endpoint=fake_cloudrun.endpoint, public_url=PUBLIC_URL,
            oidc_certs_url=certs.url, callback_auth="oidc",
        )
    )  # fmt: skip
    engine = make_engine(settings.db_url)
    migrate(engine)
    previous = EXECUTION if segment else None
    (run_id,) = insert_runs(
        engine, status=RunStatus.queued, segment=segment, execution_name=previous
    )
    fake_cloudrun.next_outcome(Outcome("hang", pending_s=600))  # pending throughout
    event = ev.StartedEvent(run_id=run_id, seq=0, segment=segment, data=ev.Started())
    token = keys["google-1"].token()
    early: list[httpx.Response] = []

    with TestClient(create_app(settings)) as client:

        def trainer_posts(execution: Execution) -> None:
            short = execution.name.rsplit("/", 1)[-1]
            early.append(post_event(client, run_id, event, token, short))

        worker = Worker(
            settings,
            engine,
            TrainerFasterThanTheRecord(CloudRunDispatcher(settings), trainer_posts),
            retry=RetryPolicy(max_attempts=3, first_backoff_seconds=0, quota_retry_seconds=0),
        )
        try:
            assert worker.dispatch_ready() == 1
        finally:
            worker.stop()
        (first,) = early
        assert_retry_later(first, "not recorded")
        (name,) = fake_cloudrun.executions
        retried = post_event(client, run_id, event, token, name.rsplit("/", 1)[-1])
        assert retried.status_code == 201, retried.text
        assert retried.json()["run_status"] == "running"
        if previous:  # the segment before has no say any more
            late = post_event(client, run_id, event, token, "tuneplane-trainer-l4-x7k2p")
            assert late.status_code == 403 and "does not serve" in late.json()["detail"]
    engine.dispose()
