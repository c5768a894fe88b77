"""Fixtures of the Cloud Run tests: the fake Cloud Run and Secret Manager servers, the Cloud
Storage emulator, and settings that point the real client libraries at them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from api.config import Settings
from api.dispatch.worker import Worker
from api.runs import artifacts
from tests.cloud.worker_world import NO_WAIT
from tests.fakes.cloudrun import FakeCloudRun
from tests.fakes.gcs import FakeGcs
from tests.fakes.secretmanager import FakeSecretManager

PROJECT = "tp-test"
TRAINER_SA = f"trainer@{PROJECT}.iam.gserviceaccount.com"
SIGNING_KEY = "k" * 64


def cloud_values(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "dispatcher": "cloudrun",
        "callback_signing_key": SIGNING_KEY,
        "gcp_project": PROJECT,
        "gcp_region": "us-central1",
        "trainer_image": f"us-central1-docker.pkg.dev/{PROJECT}/tuneplane/trainer:1",
        "bucket": "tp-artifacts",
        "trainer_service_account": TRAINER_SA,
        "hf_token_secret": "hf-token",
        "run_worker": False,
        # Required with dispatcher=cloudrun (no silent loopback default); tests that take
        # callbacks set their live server's URL.
        "public_url": "https://tuneplane-api.example",
    }
    values.update(overrides)
    return values


@pytest.fixture
def fake_cloudrun() -> Iterator[FakeCloudRun]:
    fake = FakeCloudRun()
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def cloud_settings(tmp_path: Path, fake_cloudrun: FakeCloudRun) -> Callable[..., Settings]:
    """Settings of the cloudrun dispatcher against the fake server (no database needed)."""

    def make(**overrides: Any) -> Settings:
        values = cloud_values(data_dir=tmp_path / "data", cloud_run_endpoint=fake_cloudrun.endpoint)
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def fake_secret_manager() -> Iterator[FakeSecretManager]:
    fake = FakeSecretManager()
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture(scope="session")
def fake_gcs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeGcs]:
    """One emulator per test process; each test uses buckets of its own."""
    server = FakeGcs(tmp_path_factory.mktemp("gcs") / "fake-gcs-server.log").start()
    yield server
    server.stop()


@pytest.fixture
def gcs_env(fake_gcs: FakeGcs, monkeypatch: pytest.MonkeyPatch) -> FakeGcs:
    """The storage client of this process (and of trainers it starts) goes to the emulator."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", fake_gcs.url)
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", PROJECT)
    return fake_gcs


@pytest.fixture
def fresh_credentials() -> Iterator[None]:
    """The api caches the credentials it signs URLs with; each test starts without them."""
    artifacts.reset_credentials_cache()
    yield
    artifacts.reset_credentials_cache()


# The dispatch worker with the real CloudRunDispatcher against the fake, a real database and the
# api (test_cloudrun_worker.py, test_cloudrun_faults.py; `engine` and `client` are the root
# conftest's, on these settings). A module with its own `settings` fixture keeps it.
@pytest.fixture
def settings(make_settings: Callable[..., Settings], fake_cloudrun: FakeCloudRun) -> Settings:
    return make_settings(**cloud_values(cloud_run_endpoint=fake_cloudrun.endpoint))


@pytest.fixture
def worker(settings: Settings, engine: Engine) -> Iterator[Worker]:
    w = Worker(settings, engine, retry=NO_WAIT)  # its dispatcher: make_dispatcher -> Cloud Run
    yield w
    w.stop()
