"""End to end on "Cloud Run": REST create -> the api's worker with CloudRunDispatcher -> the fake
Cloud Run server, which runs the real trainer (tiny model, digits) with the overrides it got ->
callbacks to the live api -> artifacts and checkpoints in the Cloud Storage emulator.

Segments end at a step count (`segment_max_steps`, the tests' trigger), not at a deadline: how
far a segment gets in some seconds depends on the machine and its load, its steps do not.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from sqlalchemy import Engine
from sqlmodel import col, select

from api.config import Settings
from api.db import make_engine, migrate, session_scope
from api.events.models import RunEvent
from api.main import create_app
from tests.cloud.conftest import PROJECT, TRAINER_SA, cloud_values
from tests.conftest import LiveServer, free_port
from tests.fakes.cloudrun import FakeCloudRun
from tests.fakes.gcs import FakeGcs
from tests.fakes.holdproxy import HoldingProxy
from tests.fakes.oidc import CertServer, MetadataServer, SigningKey
from trainer.checkpoints import dir_name

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@dataclass
class Stack:
    fake: FakeCloudRun
    server: LiveServer
    engine: Engine
    settings: Settings
    bucket: storage.Bucket

    def create(self, **spec: Any) -> str:
        response = httpx.post(f"{self.server.url}/api/v1/runs", json={"spec": spec})
        assert response.status_code == 201, response.text
        run_id: str = response.json()["id"]
        return run_id

    def run(self, run_id: str) -> dict[str, Any]:
        run: dict[str, Any] = httpx.get(f"{self.server.url}/api/v1/runs/{run_id}").json()
        return run

    def events(self, run_id: str, type_: str | None = None) -> list[RunEvent]:
        with session_scope(self.engine) as session:
            query = select(RunEvent).where(RunEvent.run_id == run_id)
            if type_:
                query = query.where(RunEvent.type == type_)
            rows = session.exec(query.order_by(col(RunEvent.segment), col(RunEvent.time))).all()
            return list(rows)

    def logs(self) -> str:
        return "\n".join(self.fake.log_text(name) for name in list(self.fake.executions))

    def wait(self, run_id: str, *states: str, timeout: float = 400) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.run(run_id)
            if run["status"] in states:
                return run
            time.sleep(0.5)
        raise AssertionError(f"run is {self.run(run_id)}\n{self.logs()}")


@pytest.fixture
def stack(
    tmp_path: Path,
    make_settings: Callable[..., Settings],
    gcs_env: FakeGcs,
    request: pytest.FixtureRequest,
) -> Iterator[Callable[..., Stack]]:
    made: list[tuple[FakeCloudRun, LiveServer, Engine]] = []

    def make(container_env: dict[str, str] | None = None, **overrides: Any) -> Stack:
        name = f"tp-e2e-{abs(hash(request.node.nodeid)) % 10**8}"
        gcs_env.create_bucket(name)
        fake = FakeCloudRun(
            trainer_command=[sys.executable, "-m", "trainer"],
            extra_args=["--device", "cpu"],
            extra_env={
                "STORAGE_EMULATOR_HOST": gcs_env.url,
                "GOOGLE_CLOUD_PROJECT": PROJECT,
                "HF_HUB_OFFLINE": "1",
                "CUDA_VISIBLE_DEVICES": "",
                "PYTHONUNBUFFERED": "1",
                **(container_env or {}),
            },
            log_dir=tmp_path,
            cwd=ROOT,
            container_tmp=tmp_path / "containers",
        )
        fake.start()
        port = free_port()
        values = cloud_values(
            cloud_run_endpoint=fake.endpoint,
            bucket=name,
            public_url=f"http://127.0.0.1:{port}",
            run_worker=True,
            worker_poll_seconds=0.2,
            reconcile_seconds=1.0,
        )
        values.update(overrides)
        settings = make_settings(**values)
        engine = make_engine(settings.db_url)
        migrate(engine)
        server = LiveServer(create_app(settings), port).start()
        made.append((fake, server, engine))
        client = storage.Client(project=PROJECT, credentials=AnonymousCredentials())
        return Stack(fake, server, engine, settings, client.bucket(name))

    yield make
    for fake, server, engine in made:
        server.stop()
        fake.stop()
        engine.dispose()


def tiny_spec(model: Path, **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model_id": str(model),
        "dataset": "digits",
        "train_size": 32,
        "eval_size": 10,
        "num_epochs": 1,
        "batch_size": 8,
        "gradient_accumulation_steps": 1,
        "eval_batch_size": 10,
        "learning_rate": 0.003,
        "save_steps": 2,
        "max_new_tokens": 4,
        "gradient_checkpointing": False,
        "time_budget_minutes": 10,
    }
    spec.update(overrides)
    return spec


def steps(events: list[RunEvent]) -> list[int]:
    return [e.data["step"] for e in events]


def test_a_run_survives_a_killed_task_and_ends_succeeded_with_its_artifacts_in_the_bucket(
    stack: Callable[..., Stack], tiny_model: Path, gcs_env: FakeGcs
) -> None:
    """REST -> worker -> Cloud Run -> trainer -> callbacks -> bucket, in the recommended mode
    (no token in the overrides: the trainer posts with its service account's ID token from the
    metadata server), with the GPU task killed mid-run as maintenance would: Cloud Run retries
    it and the retry resumes from the last complete checkpoint, never from one without its
    manifest."""
    google = SigningKey("google-1")
    certs, metadata = CertServer(google), MetadataServer(google, TRAINER_SA)
    # The trainer's Cloud Storage traffic goes through a proxy that holds step 4's checkpoint
    # save: the kill lands there, mid-save, on any machine.
    storage_proxy = HoldingProxy(gcs_env.url, hold_on=dir_name(4).encode()).start()
    try:
        s = stack(
            callback_auth="oidc",
            oidc_certs_url=certs.url,
            container_env={
                "GCE_METADATA_HOST": metadata.host,
                "GCE_METADATA_IP": metadata.host,
                "STORAGE_EMULATOR_HOST": storage_proxy.url,
            },
        )
        run_id = s.create(**tiny_spec(tiny_model, train_size=48))
        kill_during_a_save(s, storage_proxy, run_id)
        run = s.wait(run_id, "succeeded", "failed")
    finally:
        storage_proxy.stop()
        certs.stop()
        metadata.stop()
    assert run["status"] == "succeeded", f"{run}\n{s.logs()}"

    # One execution, started once, its task retried by the platform.
    (name,) = s.fake.executions
    assert run["execution_name"] == name and s.fake.execution(name).retried == 1
    (request,) = s.fake.calls("RunJob")
    env = {e.name: e.value for e in request.overrides.container_overrides[0].env}
    assert "TUNEPLANE_CALLBACK_TOKEN" not in env
    assert env["TUNEPLANE_CALLBACK_URL"] == f"{s.server.url}/api/v1/runs/{run_id}/events"
    assert env["TUNEPLANE_CHECKPOINT_URI"] == f"gs://{s.bucket.name}/runs/{run_id}/checkpoints"
    assert metadata.audiences and set(metadata.audiences) == {s.settings.public_url}
    assert certs.hits == 1  # cached across every callback

    first, retry = s.events(run_id, "started")
    assert (first.data["attempt"], retry.data["attempt"]) == (0, 1)
    # The newest checkpoint complete at the kill: step 2's, not step 4's (its save was cut
    # short) nor the manifest-less one planted at step 99.
    assert retry.data["resumed_from_step"] == 2
    metrics = httpx.get(f"{s.server.url}/api/v1/runs/{run_id}/metrics").json()
    assert [p["step"] for p in metrics["progress"]] == [1, 2, 3, 4, 5, 6]
    assert metrics["baseline"] is not None and metrics["final"] is not None

    prefix = f"runs/{run_id}/"
    objects = {b.name[len(prefix) :] for b in s.bucket.list_blobs(prefix=prefix)}
    assert {
        "results.json",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        # The processor beside the adapter (trainer/cli.py), so one directory loads for
        # inference: what `processor.save_pretrained` writes for Gemma 3.
        "adapter/processor_config.json",
        "adapter/tokenizer.json",
        "adapter/tokenizer_config.json",
        "adapter/chat_template.jinja",
    } <= objects
    assert run["artifact_uri"] == f"gs://{s.bucket.name}/runs/{run_id}"
    artifacts = {e.data["kind"]: e.data["uri"] for e in s.events(run_id, "artifact")}
    results = artifacts["results"]
    assert results == f"gs://{s.bucket.name}/runs/{run_id}/results.json"
    assert artifacts["processor"] == artifacts["adapter"] == f"{run['artifact_uri']}/adapter"
    listed = httpx.get(f"{s.server.url}/api/v1/runs/{run_id}/artifacts").json()["artifacts"]
    assert {a["kind"]: a["uri"] for a in listed}["results"] == results


def kill_during_a_save(s: Stack, storage_proxy: HoldingProxy, run_id: str) -> None:
    """Wait until the trainer is inside step 4's checkpoint save (its first request to Cloud
    Storage held), plant a newer checkpoint without manifest (another save a kill
    interrupted), then kill the task as maintenance would; the held request then goes."""
    assert storage_proxy.held.wait(timeout=300), s.logs()  # a hang guard
    partial = f"runs/{run_id}/checkpoints/{dir_name(99)}"
    s.bucket.blob(f"{partial}/adapter/adapter_model.safetensors").upload_from_string(b"\0" * 64)
    s.bucket.blob(f"{partial}/state.json").upload_from_string(b'{"step": 99}')
    (name,) = s.fake.executions
    s.fake.kill_task(name)  # SIGKILL to the task's processes; Cloud Run retries the task
    storage_proxy.release.set()


def test_a_run_longer_than_its_segment_completes_in_segments_with_one_history(
    stack: Callable[..., Stack], tiny_model: Path
) -> None:
    # 8 steps at 3 a segment: segments stop at steps 3 and 6, the third trains 7-8 and completes,
    # on every machine.
    s = stack(segment_max_steps=3)
    total_steps = 64 // 8
    run_id = s.create(**tiny_spec(tiny_model, train_size=64, save_steps=2))
    run = s.wait(run_id, "succeeded", "failed", timeout=420)
    assert run["status"] == "succeeded", f"{run}\n{s.logs()}"

    envs = [
        {e.name: e.value for e in r.overrides.container_overrides[0].env}
        for r in s.fake.calls("RunJob")
    ]
    segments = [int(env["TUNEPLANE_SEGMENT"]) for env in envs]
    assert segments == [0, 1, 2], segments
    assert {env["TUNEPLANE_SEGMENT_MAX_STEPS"] for env in envs} == {"3"}
    assert run["segment"] == 2

    # Each segment resumed where the one before stopped, so no step was trained twice.
    done = s.events(run_id, "segment_done")
    assert steps(done) == [3, 6]
    started = s.events(run_id, "started")
    assert [e.data["segment"] for e in started] == segments
    for before, after in zip(done, started[1:], strict=True):
        assert after.data["resumed_from_step"] == before.data["step"]
    trained = steps(s.events(run_id, "progress"))  # every logging step, once, in order
    assert trained == list(range(1, total_steps + 1)), trained
    metrics = httpx.get(f"{s.server.url}/api/v1/runs/{run_id}/metrics").json()
    assert [p["step"] for p in metrics["progress"]] == trained
    assert [p["segment"] for p in metrics["progress"]] == [0, 0, 0, 1, 1, 1, 2, 2]
    assert len(s.events(run_id, "evaluation")) == 2  # the baseline was not evaluated again


def test_a_failure_the_trainer_reports_is_final_cloud_run_does_not_retry_it(
    stack: Callable[..., Stack], tmp_path: Path, tiny_model: Path
) -> None:
    """The trainer reports `failed` and exits 0 on Cloud Run, so the platform does not spend
    its retries (each up to the task timeout of GPU) on a failure that repeats: the run fails
    with the trainer's words, and its execution has ended, not retried."""
    s = stack()
    run_id = s.create(**tiny_spec(tiny_model, model_id=str(tmp_path / "no-such-model")))
    run = s.wait(run_id, "succeeded", "failed")
    assert run["status"] == "failed" and "no-such-model" in run["status_reason"], s.logs()
    (name,) = s.fake.executions
    ex = s.fake.wait_for(name, "succeeded", "failed", "cancelled")
    assert ex.state == "succeeded" and ex.attempt == 0 and len(ex.logs) == 1, s.logs()
    assert s.fake.live_executions(run_id) == []
