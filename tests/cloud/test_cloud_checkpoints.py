"""The trainer's checkpoints in Cloud Storage (gs://, through the real client and the emulator):
only a checkpoint whose manifest is there and matches its files is ever resumed from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from tests.cloud.conftest import PROJECT
from tests.fakes.gcs import FakeGcs
from trainer.checkpoints import CheckpointStore, TrainState, dir_name

DIGEST = "spec-digest-0001"


@pytest.fixture
def bucket(gcs_env: FakeGcs, request: pytest.FixtureRequest) -> storage.Bucket:
    name = f"tp-ckpt-{abs(hash(request.node.nodeid)) % 10**8}"
    gcs_env.create_bucket(name)
    return storage.Client(project=PROJECT, credentials=AnonymousCredentials()).bucket(name)


def write_files(step: int):  # type: ignore[no-untyped-def]
    def write(directory: Path) -> None:
        (directory / "adapter").mkdir()
        (directory / "adapter" / "adapter_model.safetensors").write_bytes(bytes([step]) * 4096)
        (directory / "optimizer.pt").write_bytes(b"opt" * step)

    return write


def store(bucket: storage.Bucket, tmp_path: Path) -> CheckpointStore:
    return CheckpointStore(f"gs://{bucket.name}/runs/run_1/checkpoints", tmp_path / "work")


def state(step: int) -> TrainState:
    return TrainState(step=step, micro_batches=step * 2, total_steps=100, spec_digest=DIGEST)


def test_resume_takes_the_newest_checkpoint_whose_manifest_is_there(
    bucket: storage.Bucket, tmp_path: Path
) -> None:
    s = store(bucket, tmp_path)
    uri = s.save(state(10), write_files(10))
    assert uri == f"gs://{bucket.name}/runs/run_1/checkpoints/{dir_name(10)}"
    s.save(state(20), write_files(20))
    # A segment killed while saving step 30: its files landed, its manifest never did.
    prefix = f"runs/run_1/checkpoints/{dir_name(30)}"
    bucket.blob(f"{prefix}/adapter/adapter_model.safetensors").upload_from_string(b"\x1e" * 4096)
    bucket.blob(f"{prefix}/state.json").upload_from_string(json.dumps({"step": 30}))

    restored = store(bucket, tmp_path / "next-segment").latest(DIGEST)
    assert restored is not None
    assert restored.state.step == 20 and restored.state.micro_batches == 40
    assert restored.uri.endswith(dir_name(20))
    data = (restored.directory / "adapter" / "adapter_model.safetensors").read_bytes()
    assert data == bytes([20]) * 4096


def test_a_file_that_does_not_match_its_manifest_is_never_used(
    bucket: storage.Bucket, tmp_path: Path
) -> None:
    s = store(bucket, tmp_path)
    s.save(state(10), write_files(10))
    s.save(state(20), write_files(20))
    # Same size, other bytes: only the checksum tells.
    blob = bucket.blob(f"runs/run_1/checkpoints/{dir_name(20)}/adapter/adapter_model.safetensors")
    blob.upload_from_string(bytes([99]) * 4096)

    restored = store(bucket, tmp_path / "next").latest(DIGEST)
    assert restored is not None and restored.state.step == 10


def test_no_complete_checkpoint_means_a_fresh_start(bucket: storage.Bucket, tmp_path: Path) -> None:
    assert store(bucket, tmp_path).latest(DIGEST) is None
    bucket.blob(f"runs/run_1/checkpoints/{dir_name(5)}/state.json").upload_from_string("{}")
    assert store(bucket, tmp_path).latest(DIGEST) is None


def test_old_checkpoints_are_pruned_in_the_bucket(bucket: storage.Bucket, tmp_path: Path) -> None:
    s = store(bucket, tmp_path)
    for step in (10, 20, 30, 40):
        s.save(state(step), write_files(step))
    dirs = {b.name.split("/")[3] for b in bucket.client.list_blobs(bucket.name, prefix="runs/")}
    assert dirs == {dir_name(30), dir_name(40)}


def test_baseline_survives_between_segments(bucket: storage.Bucket, tmp_path: Path) -> None:
    store(bucket, tmp_path).save_baseline(DIGEST, {"accuracy": 0.1})
    assert store(bucket, tmp_path / "b").load_baseline(DIGEST) == {"accuracy": 0.1}
