"""Every setting of the api, in one place. Nothing else in `api/` reads the environment.

Each field is read from `TUNEPLANE_<NAME>` (or a `.env` file). Secrets have no defaults: the
embedded local mode makes its own signing key in the data directory (see `signing_key`), and
any other mode refuses to start without one. README's configuration table is checked against
this class by tests/test_readme.py.
"""

from __future__ import annotations

import ipaddress
import secrets
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from trainer.contract.spec import GpuType


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TUNEPLANE_", env_file=".env", extra="ignore", frozen=True
    )

    # -- storage --------------------------------------------------------------------------
    data_dir: Path = Field(
        Path(".tuneplane"), description="local state: SQLite file, logs, artifacts, signing key"
    )
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default: SQLite file `DATA_DIR/tuneplane.db`"
    )
    db_pool_size: int = Field(
        10,
        ge=1,
        le=40,
        description="requests that use the database at once, each with a connection of the "
        "pool (which holds 4 more for the worker); more wait, holding no connection or thread. "
        "At most 40, the worker threads that run requests (api/db.py)",
    )
    db_wait_seconds: float = Field(
        30.0,
        gt=0,
        le=600,
        description="how long a request waits for a turn at the database before a 503 with "
        "Retry-After",
    )

    # -- serving --------------------------------------------------------------------------
    public_url: str = Field(
        "http://127.0.0.1:8000",
        description="the api's URL as trainers and browsers reach it (callbacks, links); must "
        "be set with dispatcher=cloudrun or callback_auth=oidc; `tuneplane serve` derives it "
        "from --host/--port when unset",
    )
    run_worker: bool = Field(True, description="run the dispatch worker inside the api process")
    log_format: Literal["text", "json"] = Field(
        "text",
        description="`json`: one JSON object a line with the fields Cloud Logging reads "
        "(severity, message, time, trace, run_id, execution)",
    )
    access_log: bool = Field(
        True,
        description="`tuneplane serve` logs a line for every request (uvicorn's access log) "
        "but the trainers' accepted callbacks; off: none, as Cloud Run logs every request itself",
    )
    local_data_roots: list[Path] = Field(
        [],
        description="directories under which runs may name local data (`imagefolder:/dir`, "
        "`oxford-iiit-pet:/dir`) and model directories (JSON list); others are refused when the "
        "local dispatcher would read them; default: the data directory (api/runs/local_paths.py)",
    )
    hub_url: str = Field(
        "https://huggingface.co",
        description="where a Hub model id's config.json and chat template are read when a run "
        "is created (api/runs/model_check.py); empty: only local model directories are checked",
    )

    # -- access (api/auth/access.py) ------------------------------------------------------
    auth_enabled: bool = Field(
        False, description="require API tokens on /api/v1 and a login on the dashboard"
    )
    allow_open_network: bool = Field(
        False,
        description="serve non-loopback addresses with auth off (e.g. behind an "
        "authenticating proxy)",
    )
    session_hours: float = Field(12.0, gt=0, le=24 * 30, description="dashboard login lifetime")

    # -- outgoing notifications (api/notify/service.py) -----------------------------------
    webhook_secret: SecretStr | None = Field(
        None, description="HMAC key of template webhooks that do not set their own `secret`"
    )
    webhook_max_attempts: int = Field(6, ge=1, le=50, description="posts before giving up")
    webhook_backoff_seconds: float = Field(
        2.0, gt=0, le=3600, description="wait before the first retry; doubles each time"
    )
    webhook_timeout_seconds: float = Field(10.0, gt=0, le=120, description="per post")
    webhook_allowed_networks: list[str] = Field(
        [],
        description="CIDR networks webhooks may reach although not public (JSON list, e.g. "
        '`["10.8.0.0/16"]`); default none: loopback, private, link-local and metadata '
        "addresses are refused (api/notify/address_guard.py)",
    )

    # -- dispatch -------------------------------------------------------------------------
    dispatcher: Literal["local", "cloudrun"] = Field(
        "local", description="`local`: trainer subprocesses; `cloudrun`: Cloud Run Jobs"
    )
    max_concurrency: int = Field(
        1,
        ge=1,
        le=1000,
        description="runs active at the same time; local trainers split the cores among them "
        "(each gets OMP_NUM_THREADS = cores / this, unless OMP_NUM_THREADS is set)",
    )
    worker_poll_seconds: float = Field(1.0, gt=0, le=60, description="dispatch loop period")
    reconcile_seconds: float = Field(5.0, gt=0, le=600, description="execution polling period")
    claim_lease_seconds: int = Field(
        120, ge=5, le=3600, description="how long a worker's claim on a run lasts"
    )
    callback_signing_key: SecretStr | None = Field(
        None, description="HMAC key of per-run callback tokens (required unless dispatcher=local)"
    )
    callback_token_ttl_hours: float = Field(
        24.0, gt=0, le=24 * 14, description="lifetime of a per-run callback token"
    )
    trainer_python: str | None = Field(
        None, description="python that runs `-m trainer` locally; default: the api's own"
    )
    trainer_device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="device the local trainer uses"
    )
    local_trainers_on_stop: Literal["checkpoint", "keep"] = Field(
        "checkpoint",
        description="what stopping `tuneplane serve` or `worker` (SIGTERM, Ctrl-C) does to its "
        "local trainers: `checkpoint`: each gets SIGTERM, saves a checkpoint and reports, and "
        "its run is queued to resume at the next start; `keep`: they train on, and the next "
        "start (same data directory and port) takes them back at its first reconcile",
    )
    local_stop_grace_seconds: float = Field(
        60.0,
        gt=0,
        le=3600,
        description="with local_trainers_on_stop=checkpoint, how long stopping waits for the "
        "trainers' checkpoints; one still saving then is judged by the next start",
    )

    # -- Google Cloud (dispatcher=cloudrun) -----------------------------------------------
    gcp_project: str | None = Field(None, description="Google Cloud project id")
    gcp_region: str = Field("us-central1", description="Cloud Run region")
    cloud_run_job: str = Field("tuneplane-trainer", description="name of the trainer Job")
    cloud_run_endpoint: str | None = Field(
        None, description="`host:port` of a plaintext Cloud Run API (emulators, tests)"
    )
    trainer_image: str | None = Field(None, description="trainer container image")
    bucket: str | None = Field(None, description="Cloud Storage bucket for artifacts/checkpoints")
    trainer_service_account: str | None = Field(
        None, description="service account of the Job (required with callback_auth=oidc)"
    )
    hf_token_secret: str | None = Field(
        None, description="Secret Manager secret holding HF_TOKEN (`projects/P/secrets/S`)"
    )
    default_gpu_type: GpuType = Field("nvidia-l4", description="GPU of runs that name none")
    cloud_run_max_retries: int = Field(
        3, ge=0, le=10, description="platform retries of a task; a retry resumes from a checkpoint"
    )
    cloud_run_timeout_margin_minutes: int = Field(
        5, ge=1, le=30, description="task timeout beyond the time budget (final save, upload)"
    )
    cloud_run_long_gpu_tasks: bool = Field(
        False,
        description="use Cloud Run's preview 'long running GPU jobs' (task timeouts up to 12 h "
        "instead of 1 h): fewer segments, but the Job runs at launch stage BETA",
    )
    cloud_run_wait_seconds: int = Field(
        3600,
        ge=0,
        le=7 * 24 * 3600,
        description="how long a run waits for a GPU (stock-out, quota) or for IAM to propagate "
        "before it fails with the reason",
    )
    vpc_network: str | None = Field(None, description="VPC network of the trainer (Direct VPC)")
    vpc_subnet: str | None = Field(None, description="subnetwork of the trainer (Direct VPC)")
    vpc_egress: Literal["all-traffic", "private-ranges-only"] = Field(
        "private-ranges-only", description="which trainer traffic goes through the VPC"
    )
    callback_auth: Literal["token", "oidc"] = Field(
        "token", description="trainer callbacks: `token` (HMAC in the env) or `oidc` (ID token)"
    )
    oidc_certs_url: str = Field(
        "https://www.googleapis.com/oauth2/v1/certs", description="Google's ID-token certificates"
    )
    secret_manager_endpoint: str | None = Field(
        None, description="`host:port` of a plaintext Secret Manager API (emulators, tests)"
    )
    signed_url_minutes: int = Field(
        60, ge=1, le=7 * 24 * 60, description="lifetime of signed artifact download URLs"
    )
    segment_seconds_max: int | None = Field(
        None, ge=10, le=720 * 60, description="cap on each segment's length (demos)"
    )
    # Tests end segments at a step count, the same on every machine; a wall-clock cap ends them
    # wherever the machine's speed got to. Production leaves it unset.
    segment_max_steps: int | None = Field(
        None, ge=1, description="testing knob: end each segment after this many optimizer steps"
    )

    @model_validator(mode="after")
    def _secrets_outside_local_mode(self) -> Settings:
        if self.dispatcher != "local" and self.callback_signing_key is None:
            raise ValueError(
                "TUNEPLANE_CALLBACK_SIGNING_KEY is required when TUNEPLANE_DISPATCHER is not "
                "'local' (generate one with: "
                "python -c 'import secrets; print(secrets.token_hex(32))')"
            )
        return self

    @model_validator(mode="after")
    def _cloud_callbacks_can_arrive(self) -> Settings:
        # Checked here, not only where the dispatcher is built: the api verifies callbacks
        # even when its worker runs elsewhere, and a mistake here shows only when a trainer's
        # events are refused (and lost with its container).
        if (self.dispatcher == "cloudrun" or self.callback_auth == "oidc") and (
            "public_url" not in self.model_fields_set
        ):
            raise ValueError(
                "TUNEPLANE_PUBLIC_URL must be set when TUNEPLANE_DISPATCHER=cloudrun or "
                "TUNEPLANE_CALLBACK_AUTH=oidc: it is the URL trainers reach the api at (their "
                "callbacks, and the audience of their ID tokens), and the default "
                f"{self.public_url} is this machine's loopback, which no Cloud Run task reaches"
            )
        if self.callback_auth == "oidc" and not self.trainer_service_account:
            raise ValueError(
                "TUNEPLANE_CALLBACK_AUTH=oidc needs TUNEPLANE_TRAINER_SERVICE_ACCOUNT: only ID "
                "tokens of that account may post a trainer's events "
                "(e.g. tuneplane-trainer@PROJECT.iam.gserviceaccount.com)"
            )
        return self

    @model_validator(mode="after")
    def _networks_parse(self) -> Settings:
        for network in self.webhook_allowed_networks:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(
                    f"TUNEPLANE_WEBHOOK_ALLOWED_NETWORKS: {network!r} is not a network "
                    "(write e.g. 10.8.0.0/16)"
                ) from None
        return self

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'tuneplane.db'}"

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def runs_dir(self) -> Path:
        return self.data_dir / "runs"

    @cached_property
    def signing_key(self) -> bytes:
        """The callback signing key. In local mode without one, a random key is kept in the data
        directory so that tokens survive an api restart (a trainer may outlive the api)."""
        if self.callback_signing_key is not None:
            return self.callback_signing_key.get_secret_value().encode()
        path = self.data_dir / "signing.key"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(secrets.token_hex(32))
            path.chmod(0o600)
        return path.read_text().strip().encode()


class ClientSettings(BaseSettings):
    """What the HTTP clients (`tuneplane retrain`, `tuneplane runs`) need: where the api is and
    the token to show it. Separate from `Settings` because a CI job has none of the server's."""

    model_config = SettingsConfigDict(
        env_prefix="TUNEPLANE_", env_file=".env", extra="ignore", frozen=True
    )

    url: str = Field("http://127.0.0.1:8000", description="the api's base URL (clients)")
    token: SecretStr | None = Field(None, description="API token the clients send (`tp_...`)")
