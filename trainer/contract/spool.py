"""Where a run's undelivered events wait: the trainer writes the spool, the local dispatcher reads
what a trainer left behind. One file per run, shared by its segments, so the next segment re-sends
what an earlier one could not deliver."""

from __future__ import annotations

import os
from pathlib import Path


def spool_file(spool_dir: str | os.PathLike[str], run_id: str) -> Path:
    """The spool file of `run_id` under `spool_dir`."""
    return Path(spool_dir) / f"{run_id}.spool.jsonl"
