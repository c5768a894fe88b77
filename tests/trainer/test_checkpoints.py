"""Checkpoints in a local directory: the manifest goes last and decides what counts."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from trainer.checkpoints import (
    MANIFEST,
    CheckpointMismatch,
    CheckpointStore,
    TrainState,
    dir_name,
    spec_digest,
)
from trainer.contract.spec import RunSpec
from trainer.storage import LocalLocation, open_location, upload_tree


def _writer(payload: bytes) -> Callable[[Path], None]:
    def write(directory: Path) -> None:
        (directory / "adapter_model.safetensors").write_bytes(payload)
        (directory / "sub").mkdir()
        (directory / "sub" / "optimizer.pt").write_bytes(payload * 3)

    return write


@pytest.fixture
def store(tmp_path: Path) -> CheckpointStore:
    return CheckpointStore(tmp_path / "ckpts", work_dir=tmp_path / "work")


def test_save_writes_a_manifest_that_lists_every_file(store: CheckpointStore) -> None:
    uri = store.save(TrainState(step=5, spec_digest="d"), _writer(b"abc"))
    directory = Path(uri)
    assert directory.name == dir_name(5)
    manifest = json.loads((directory / MANIFEST).read_text())
    assert manifest["step"] == 5
    assert set(manifest["files"]) == {"adapter_model.safetensors", "sub/optimizer.pt", "state.json"}
    assert manifest["files"]["sub/optimizer.pt"]["size"] == 9
    assert store.last_save_seconds is not None


def test_latest_restores_the_newest_complete_checkpoint(store: CheckpointStore) -> None:
    store.save(TrainState(step=10, micro_batches=20, spec_digest="d"), _writer(b"ten"))
    store.save(TrainState(step=20, micro_batches=40, spec_digest="d"), _writer(b"twenty"))
    restored = store.latest("d")
    assert restored is not None
    assert restored.state.step == 20 and restored.state.micro_batches == 40
    assert (restored.directory / "adapter_model.safetensors").read_bytes() == b"twenty"


def test_a_checkpoint_without_manifest_is_ignored(store: CheckpointStore) -> None:
    store.save(TrainState(step=10, spec_digest="d"), _writer(b"ten"))
    uri = store.save(TrainState(step=20, spec_digest="d"), _writer(b"twenty"))
    (Path(uri) / MANIFEST).unlink()  # as if the process died before the manifest was written
    restored = store.latest("d")
    assert restored is not None and restored.state.step == 10


def test_a_checkpoint_whose_file_changed_is_ignored(store: CheckpointStore) -> None:
    store.save(TrainState(step=10, spec_digest="d"), _writer(b"ten"))
    uri = store.save(TrainState(step=20, spec_digest="d"), _writer(b"twenty"))
    (Path(uri) / "adapter_model.safetensors").write_bytes(b"TWENTY")  # same size, other bytes
    restored = store.latest("d")
    assert restored is not None and restored.state.step == 10


def test_a_checkpoint_missing_a_listed_file_is_ignored(store: CheckpointStore) -> None:
    uri = store.save(TrainState(step=3, spec_digest="d"), _writer(b"x"))
    (Path(uri) / "sub" / "optimizer.pt").unlink()
    assert store.latest("d") is None


def test_a_torn_manifest_is_ignored(store: CheckpointStore) -> None:
    uri = store.save(TrainState(step=3, spec_digest="d"), _writer(b"x"))
    (Path(uri) / MANIFEST).write_text('{"files": {"state.js')
    assert store.latest("d") is None


def test_no_checkpoint_at_all(store: CheckpointStore) -> None:
    assert store.latest("d") is None


def test_only_the_last_two_complete_checkpoints_are_kept(store: CheckpointStore) -> None:
    for step in (1, 2, 3, 4):
        store.save(TrainState(step=step, spec_digest="d"), _writer(b"s"))
    names = sorted(p.name for p in Path(store.uri).iterdir())
    assert names == [dir_name(3), dir_name(4)]


def test_saving_a_step_again_replaces_a_stale_copy(store: CheckpointStore) -> None:
    stale = Path(store.uri) / dir_name(7)
    stale.mkdir(parents=True)
    (stale / "leftover.bin").write_bytes(b"old")
    store.save(TrainState(step=7, spec_digest="d"), _writer(b"new"))
    assert not (stale / "leftover.bin").exists()
    assert store.latest("d") is not None


def test_a_checkpoint_of_another_spec_is_refused(store: CheckpointStore) -> None:
    a = RunSpec(model_id="m", dataset="digits")
    b = RunSpec(model_id="m", dataset="digits", lora_r=8)
    # A different time budget or save interval is the same run (segments may differ in them).
    assert spec_digest(a) == spec_digest(a.model_copy(update={"time_budget_minutes": 7}))
    assert spec_digest(a) != spec_digest(b)
    store.save(TrainState(step=1, spec_digest=spec_digest(a)), _writer(b"s"))
    with pytest.raises(CheckpointMismatch, match="different spec"):
        store.latest(spec_digest(b))


def test_baseline_is_kept_per_spec(store: CheckpointStore) -> None:
    assert store.load_baseline("d") is None
    store.save_baseline("d", {"accuracy": 0.1})
    assert store.load_baseline("d") == {"accuracy": 0.1}
    with pytest.raises(CheckpointMismatch):
        store.load_baseline("other")


def test_local_location(tmp_path: Path) -> None:
    loc = open_location(tmp_path / "root")
    assert isinstance(loc, LocalLocation)
    loc.write_bytes("a/b.txt", b"hello")
    assert loc.read_bytes("a/b.txt") == b"hello"
    assert loc.child("a").read_bytes("b.txt") == b"hello"
    with pytest.raises(FileNotFoundError):
        loc.read_bytes("missing")
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f.bin").write_bytes(b"12345")
    assert upload_tree(src, loc.child("up")) == ["d/f.bin"]
    assert loc.list() == {"a/b.txt": 5, "up/d/f.bin": 5}
    loc.download("up/d/f.bin", tmp_path / "down" / "f.bin")
    assert (tmp_path / "down" / "f.bin").read_bytes() == b"12345"
    loc.child("up").delete()
    assert loc.list() == {"a/b.txt": 5}


def test_locations_refuse_what_they_cannot_reach() -> None:
    with pytest.raises(ValueError, match="only local paths and gs://"):
        open_location("s3://bucket/x")
    with pytest.raises(ValueError, match="bucket"):
        open_location("gs://")
    assert open_location("gs://bucket/runs/r1/").uri == "gs://bucket/runs/r1"
