"""Resumable checkpoints under a local directory or `gs://` prefix.

Layout: `ROOT/checkpoint-00000120/` holding the adapter (LoRA and the fully trained projector,
as peft saves them), the optimizer and scheduler state, RNG states, `state.json` (step, position
in the data order) and `manifest.json`. The manifest is written last and lists every other file
with its size and sha256: a checkpoint counts only when its manifest is there and every file
matches it, so a save interrupted by a kill (Cloud Run GPU tasks can die at any moment) is never
resumed from. `ROOT/baseline.json` keeps the baseline evaluation so that a resumed segment does
not repeat it.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from trainer.contract.spec import RunSpec
from trainer.storage import Location, open_location

MANIFEST = "manifest.json"
STATE = "state.json"
BASELINE = "baseline.json"
KEEP = 2
_DIR = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainState:
    """Where training is: enough to continue exactly where a checkpoint left off."""

    step: int = 0  # optimizer steps done
    micro_batches: int = 0  # micro-batches consumed, over all epochs (the data order position)
    total_steps: int = 0
    training_done: bool = False
    train_seconds: float = 0.0  # time spent in training, over all segments
    train_samples: int = 0  # samples trained on, over all segments
    spec_digest: str = ""  # which run the checkpoint belongs to (see `spec_digest`)
    # The step plan's micro-batch (trainer.plan): `micro_batches` counts in its units, so a
    # later segment keeps it whatever its own GPU would pick. 0: written before plans existed.
    micro_batch: int = 0


@dataclass
class Restored:
    state: TrainState
    directory: Path  # a local, verified copy of the checkpoint's files
    uri: str


# Fields that do not change what training computes: a later segment may differ in them.
_NOT_IN_DIGEST = {"time_budget_minutes", "gpu_type", "save_steps", "eval_batch_size"}


def spec_digest(spec: RunSpec) -> str:
    """A fingerprint of what a run trains and evaluates, stored with its checkpoints and its
    baseline, so that a checkpoint directory reused by a different run is refused instead of
    silently resumed."""
    values = spec.model_dump(exclude=_NOT_IN_DIGEST)
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


class CheckpointMismatch(RuntimeError):
    pass


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dir_name(step: int) -> str:
    return f"checkpoint-{step:08d}"


class CheckpointStore:
    def __init__(self, root: str | Path, work_dir: Path, keep: int = KEEP) -> None:
        self.root: Location = open_location(root)
        self.work_dir = Path(work_dir)  # local scratch space for staging and downloads
        self.keep = keep
        self.last_save_seconds: float | None = None

    @property
    def uri(self) -> str:
        return self.root.uri

    # ---- writing ----------------------------------------------------------------------------

    def save(self, state: TrainState, write_files: Any) -> str:
        """Save a checkpoint at `state.step`: `write_files(dir)` writes the heavy files into a
        local staging directory, they are copied to the store, and the manifest goes last.
        Returns the checkpoint's URI."""
        started = time.monotonic()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix="ckpt-", dir=self.work_dir))
        try:
            write_files(staging)
            (staging / STATE).write_text(json.dumps(asdict(state), indent=1))
            files = {
                p.relative_to(staging).as_posix(): {
                    "size": p.stat().st_size,
                    "sha256": sha256_file(p),
                }
                for p in sorted(staging.rglob("*"))
                if p.is_file()
            }
            target = self.root.child(dir_name(state.step))
            # A stale copy of this step (from a segment that died mid-save) must not keep a
            # manifest that could be read while its files are being replaced.
            target.delete()
            for name in files:
                target.upload(staging / name, name)
            manifest = {
                "format": 1,
                "step": state.step,
                "created": datetime.now(UTC).isoformat(),
                "files": files,
            }
            target.write_bytes(MANIFEST, json.dumps(manifest, indent=1).encode())
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.last_save_seconds = time.monotonic() - started
        self.prune(keep_step=state.step)
        return target.uri

    def prune(self, keep_step: int) -> None:
        """Keep the newest `keep` complete checkpoints (the one just written among them);
        remove older ones and incomplete leftovers below the newest."""
        steps = self._steps()
        complete = [s for s in steps if s <= keep_step and self._has_manifest(s)]
        kept = set(sorted(complete, reverse=True)[: self.keep]) | {keep_step}
        for step in steps:
            if step not in kept and step < keep_step:
                self.root.child(dir_name(step)).delete()

    # ---- reading ----------------------------------------------------------------------------

    def _steps(self) -> list[int]:
        steps = set()
        for name in self.root.list():
            m = _DIR.match(name.split("/", 1)[0])
            if m:
                steps.add(int(m.group(1)))
        return sorted(steps)

    def _has_manifest(self, step: int) -> bool:
        try:
            self.root.child(dir_name(step)).read_bytes(MANIFEST)
        except FileNotFoundError:
            return False
        return True

    def latest(self, digest: str) -> Restored | None:
        """The newest checkpoint whose manifest verifies, downloaded and checked; None if none.
        Raises CheckpointMismatch when it belongs to a run with another spec."""
        for step in reversed(self._steps()):
            location = self.root.child(dir_name(step))
            local = self.work_dir / "restore" / dir_name(step)
            problem = self._fetch_verified(location, local)
            if problem is None:
                state = TrainState(**json.loads((local / STATE).read_text()))
                if state.spec_digest != digest:
                    raise CheckpointMismatch(
                        f"{location.uri} belongs to a run with a different spec; use another "
                        "--output-dir / checkpoint location, or remove it"
                    )
                return Restored(state, local, location.uri)
            print(f"ignoring checkpoint {location.uri}: {problem}", file=sys.stderr)
            shutil.rmtree(local, ignore_errors=True)
        return None

    def _fetch_verified(self, location: Location, local: Path) -> str | None:
        try:
            manifest = json.loads(location.read_bytes(MANIFEST))
            files = manifest["files"]
        except FileNotFoundError:
            return "no manifest (an interrupted save)"
        except (ValueError, KeyError, TypeError) as exc:
            return f"unreadable manifest ({exc})"
        if STATE not in files:
            return f"manifest lists no {STATE}"
        shutil.rmtree(local, ignore_errors=True)
        present = location.list()
        for name, meta in files.items():
            if name not in present:
                return f"{name} is missing"
            if present[name] != meta["size"]:
                return f"{name} has {present[name]} bytes, the manifest says {meta['size']}"
            location.download(name, local / name)
            if sha256_file(local / name) != meta["sha256"]:
                return f"{name} does not match its sha256 in the manifest"
        return None

    # ---- baseline ---------------------------------------------------------------------------

    def save_baseline(self, digest: str, metrics: dict[str, Any]) -> None:
        data = {"spec_digest": digest, "metrics": metrics}
        self.root.write_bytes(BASELINE, json.dumps(data).encode())

    def load_baseline(self, digest: str) -> dict[str, Any] | None:
        """The baseline metrics recorded for this run, if any."""
        try:
            data = json.loads(self.root.read_bytes(BASELINE))
        except FileNotFoundError:
            return None
        except ValueError:
            return None  # a torn write cannot happen (write-then-rename), but never trust it
        if data.get("spec_digest") != digest:
            raise CheckpointMismatch(
                f"{self.uri} holds the baseline of a different run (another spec); "
                "use another --output-dir / checkpoint location, or remove it"
            )
        metrics: dict[str, Any] = data["metrics"]
        return metrics
