"""End to end on "Cloud Run": REST create -> the api's worker with CloudRunDispatcher -> the fake
Cloud Run server, which runs the real trainer (tiny model, digits) with the overrides it got ->
callbacks to the live api -> artifacts and checkpoints in the Cloud Storage emulator.

Segments are kept short with `segment_seconds_max` (the worker's cap on a segment's deadline),
since a spec's time budget is at least two minutes.
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
from tests.fakes.oidc import CertServer, MetadataServer, SigningKey

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
    stack: Callable[..., Stack], tiny_model: Path
) -> None:
    """REST -> worker -> Cloud Run -> trainer -> callbacks -> bucket, in the recommended mode
    (no token in the overrides: the trainer posts with its service account's ID token from the
    metadata server), with the GPU task killed mid-run as maintenance would: Cloud Run retries
    it and the retry resumes from the last complete checkpoint, never from one without its
    manifest."""
    google = SigningKey("google-1")
    certs, metadata = CertServer(google), MetadataServer(google, TRAINER_SA)
    try:
        s = stack(
            callback_auth="oidc",
            oidc_certs_url=certs.url,
            container_env={"GCE_METADATA_HOST": metadata.host, "GCE_METADATA_IP": metadata.host},
        )
        run_id = s.create(**tiny_spec(tiny_model, train_size=48))
        killed_after = kill_after_a_checkpoint(s, run_id)
        run = s.wait(run_id, "succeeded", "failed")
    finally:
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
    resumed = retry.data["resumed_from_step"]
    # The newest checkpoint complete at the kill: at least the one reported before it, a
    # multiple of save_steps, and not the manifest-less one planted at step 99.
    assert killed_after <= resumed < 99 and resumed % 2 == 0, (killed_after, resumed)
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


def kill_after_a_checkpoint(s: Stack, run_id: str) -> int:
    """Wait for a checkpoint, plant a newer one without manifest (a save a kill interrupted),
    then kill the task; returns the newest checkpoint step reported before the kill."""
    deadline = time.monotonic() + 300
    while not s.events(run_id, "checkpoint"):
        assert time.monotonic() < deadline, s.logs()
        assert s.run(run_id)["status"] not in ("failed", "succeeded"), s.logs()
        time.sleep(0.2)
    partial = f"runs/{run_id}/checkpoints/checkpoint-00000099"
    s.bucket.blob(f"{partial}/adapter/adapter_model.safetensors").upload_from_string(b"\0" * 64)
    s.bucket.blob(f"{partial}/state.json").upload_from_string(b'{"step": 99}')
    seen = max(c.data["step"] for c in s.events(run_id, "checkpoint"))
    (name,) = s.fake.executions
    s.fake.kill_task(name)  # SIGKILL to the task's processes; Cloud Run retries the task
    return seen


def test_a_run_longer_than_its_segment_completes_in_segments_with_one_history(
    stack: Callable[..., Stack], tiny_model: Path
) -> None:
    # Each segment spends its first seconds starting up (imports, model, checkpoint download):
    # about 4 s on an idle 2-core machine, 7-10 s under CI's load. A 30 s cap leaves each one
    # 20 s or more of training. Measured on a 2-core machine: two segments in 38 s alone, 60 s
    # with a second trainer beside it. (A 10 s cap left a loaded machine's segments time for
    # one step each: 40 segments in 420 s, and the test timed out.)
    s = stack(segment_seconds_max=30)
    total_steps = 512 * 4 // 8
    run_id = s.create(**tiny_spec(tiny_model, train_size=512, num_epochs=4, save_steps=16))
    run = s.wait(run_id, "succeeded", "failed", timeout=420)
    assert run["status"] == "succeeded", f"{run}\n{s.logs()}"

    segments = [
        int({e.name: e.value for e in r.overrides.container_overrides[0].env}["TUNEPLANE_SEGMENT"])
        for r in s.fake.calls("RunJob")
    ]
    assert len(segments) >= 2 and segments == list(range(len(segments))), segments
    print(f"\n{total_steps} steps in {len(segments)} segments")
    assert run["segment"] == segments[-1]

    # Each segment resumed where the one before stopped, so no step was trained twice.
    done = s.events(run_id, "segment_done")
    started = s.events(run_id, "started")
    assert [e.data["segment"] for e in started] == segments
    for before, after in zip(done, started[1:], strict=True):
        assert after.data["resumed_from_step"] == before.data["step"]
    trained = steps(s.events(run_id, "progress"))  # every logging step, once, in order
    assert trained == sorted(set(trained)) and trained[-1] == total_steps, trained
    metrics = httpx.get(f"{s.server.url}/api/v1/runs/{run_id}/metrics").json()
    assert [p["step"] for p in metrics["progress"]] == trained
    by_step = [p["segment"] for p in metrics["progress"]]
    assert by_step == sorted(by_step)  # later steps, later segments
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
