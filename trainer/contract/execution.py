"""The environment a dispatcher gives one trainer execution (part of the api <-> trainer contract).

Both dispatchers build it with `ExecutionEnv(...).as_environ()`; the trainer reads it back with
`ExecutionEnv.from_environ()`. This is the only place in the trainer that reads the environment.
A trainer started by hand, with none of these set, reports to stdout and writes locally.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, SecretStr

PREFIX = "TUNEPLANE_"
# Set by Cloud Run Jobs itself on every task (not by us).
CLOUD_RUN_TASK_ATTEMPT = "CLOUD_RUN_TASK_ATTEMPT"
CLOUD_RUN_EXECUTION = "CLOUD_RUN_EXECUTION"


# The variables a dispatcher sets, each as TUNEPLANE_<NAME>.
OWN_FIELDS = (
    "run_id",
    "callback_url",
    "callback_token",
    "artifact_uri",
    "checkpoint_uri",
    "deadline",
    "segment",
    "segment_max_steps",
    "spool_dir",
)


class ExecutionEnv(BaseModel):
    model_config = ConfigDict(frozen=True)

    run_id: str | None = None
    callback_url: str | None = Field(None, description="the api's events endpoint for this run")
    callback_token: SecretStr | None = Field(None, description="per-run credential (bearer)")
    artifact_uri: str | None = Field(None, description="gs://bucket/runs/ID or a local directory")
    checkpoint_uri: str | None = Field(None, description="where checkpoints live across segments")
    deadline: datetime | None = Field(None, description="save and stop with segment_done by then")
    segment: int = 0
    # A testing knob (api setting `segment_max_steps`): a segment that ends after a number of
    # optimizer steps is the same on every machine, where a deadline ends it wherever the
    # machine's speed has got to. Production leaves it unset and keeps only the deadline.
    segment_max_steps: int | None = Field(
        None, ge=1, description="end the segment after this many optimizer steps (tests)"
    )
    spool_dir: str | None = Field(None, description="where events the api did not take wait")
    # Set by the platform, not by the dispatcher:
    task_attempt: int = 0
    execution: str | None = None

    def as_environ(self) -> dict[str, str]:
        """The variables a dispatcher sets (the platform's own are left to the platform)."""
        out: dict[str, str] = {}
        for name in OWN_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            elif isinstance(value, datetime):
                value = value.isoformat()
            out[PREFIX + name.upper()] = str(value)
        return out

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> ExecutionEnv:
        env = os.environ if environ is None else environ
        values: dict[str, str] = {
            name: env[PREFIX + name.upper()]
            for name in OWN_FIELDS
            if env.get(PREFIX + name.upper())
        }
        if env.get(CLOUD_RUN_TASK_ATTEMPT):
            values["task_attempt"] = env[CLOUD_RUN_TASK_ATTEMPT]
        if env.get(CLOUD_RUN_EXECUTION):
            values["execution"] = env[CLOUD_RUN_EXECUTION]
        return cls.model_validate(values)
