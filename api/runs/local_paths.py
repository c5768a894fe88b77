"""Which of this server's files a run may name: `imagefolder:/dir`, `oxford-iiit-pet:/dir` and a
local model directory only under `TUNEPLANE_LOCAL_DATA_ROOTS` (default: the data directory).

With the local dispatcher the trainer runs on this machine as the server's user, and its class
folders and file names come back as labels and sample ids: without a bound, whoever may submit a
run could read any folder the server can. A path is checked after symlinks and `..` are resolved
(the trainer opens what the path resolves to), and the refusal names only the path as given and
the roots, never the resolved path, and is the same whether the path exists or not: it must not
tell an outsider what is on the disk. Relative paths are refused: the trainer runs in the run's
own directory, so one could name nothing useful there. Hub ids (`org/name`) are not paths.

With Cloud Run a path names a file in the trainer's container (a mounted bucket), not here, so
nothing is refused; but the api reads a local model directory for the create-time check
(api/runs/model_check.py) only under the roots, for the same reason.

The roots are checked when a run is made and again when the local dispatcher starts each of its
segments (api/dispatch/local.py), with the same words: a run queued (or between segments)
while the roots were wider fails instead of reading outside the roots the server has now.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from api.config import Settings
from api.errors import invalid
from trainer.contract.spec import RunSpec

# The explicit local forms of `RunSpec.model_id` (trainer.contract.spec._MODEL_ID): anything
# else is a Hub id.
_LOCAL_MODEL_PREFIXES = ("/", ".", "~")


@dataclass(frozen=True)
class LocalPaths:
    roots: tuple[Path, ...]  # resolved
    refuse_outside: bool  # the local dispatcher: its trainers read this machine's files

    @classmethod
    def of(cls, settings: Settings) -> LocalPaths:
        roots = settings.local_data_roots or [settings.data_dir]
        return cls(tuple(Path(r).resolve() for r in roots), settings.dispatcher == "local")

    def inside(self, path: str) -> Path | None:
        """`path` resolved (symlinks, `..`), when it is absolute and lies under a root."""
        given = Path(path)
        if not given.is_absolute():
            return None
        resolved = given.resolve()
        return resolved if any(resolved.is_relative_to(r) for r in self.roots) else None

    def check(self, spec: RunSpec, where: str) -> None:
        """422 for a local path of `spec` outside the roots, when the trainer runs here;
        `where` is where the spec sits in the request (`body.spec`, `body.overrides`)."""
        refused = self.refusal(spec) if self.refuse_outside else None
        if refused is not None:
            field, message = refused
            raise invalid(f"{where}.{field}", message, "Path outside the data roots")

    def refusal(self, spec: RunSpec) -> tuple[str, str] | None:
        """(field, why) for the first local path of `spec` outside the roots, or None. Asked at
        creation (`check`) and again by the local dispatcher before each start: a run queued
        before the roots were narrowed must not read outside the new ones."""
        for field, path in local_paths(spec):
            if self.inside(path) is None:
                return field, (
                    f"{path!r} is not a directory this server lets runs read: local paths must "
                    f"be absolute and lie under TUNEPLANE_LOCAL_DATA_ROOTS ({self._shown()})"
                )
        return None

    def _shown(self) -> str:
        return ", ".join(str(r) for r in self.roots)


def local_paths(spec: RunSpec) -> list[tuple[str, str]]:
    """(field, path) of each file of this machine that `spec` names."""
    found = []
    if is_local_model(spec.model_id):
        found.append(("model_id", spec.model_id))
    if spec.data.path is not None:
        found.append(("dataset", spec.data.path))
    return found


def is_local_model(model_id: str) -> bool:
    return model_id.startswith(_LOCAL_MODEL_PREFIXES)
