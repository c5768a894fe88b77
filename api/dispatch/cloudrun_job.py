"""The trainer's Cloud Run Job, built from settings, and the per-run overrides of one execution.

One Job per GPU type (`<cloud_run_job>-l4`, `<cloud_run_job>-rtx-pro-6000`): the accelerator, CPU
and memory are part of the Job's template and `run_job` overrides cannot change them. Everything
per run (the spec's flags, run id, callback, artifact and checkpoint locations, deadline, task
timeout) travels as overrides. `deploy/deploy.sh` creates the same Job with gcloud;
tests/cloud/test_cloud_deploy.py checks that the two agree on every field `managed_view` compares.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Any

from google.api import launch_stage_pb2
from google.cloud import run_v2
from google.protobuf import duration_pb2

from api.config import Settings
from api.dispatch.base import GPU_TASK_SECONDS_GA, max_task_seconds
from trainer.contract.execution import ExecutionEnv
from trainer.contract.spec import GPU_TYPES, RunSpec

CONTAINER = "trainer"
BUCKET_VOLUME = "bucket"
# The bucket is mounted read-only: models can be read from it without the Hub; the trainer writes
# artifacts and checkpoints through the Cloud Storage API, whose writes are atomic per object.
BUCKET_MOUNT = "/mnt/bucket"
# Where the trainer keeps its working copy inside the container (in-memory disk on Cloud Run).
LOCAL_OUTPUT_DIR = "/tmp/tuneplane/output"
# The Hugging Face cache lives in the bucket, not on the container's file system: that one is
# in memory and "counts against" the instance's memory
# (https://cloud.google.com/run/docs/container-contract#filesystem), and Gemma 3 12B's ~24 GB
# of weights do not fit an L4 instance's 16 GiB. Through the writable mount
# (https://cloud.google.com/run/docs/configuring/jobs/cloud-storage-volume-mounts) a download
# stages one file at a time in memory ("the entire file is staged in Cloud Run memory before
# the file is written"), reads do not download whole files, and the next run finds the weights
# there. `only-dir` (a gcsfuse flag) keeps the mount to the bucket's `hf-cache/` prefix; that
# Cloud Run passes it through is documented for mount options in general, not for this flag.
HF_CACHE_VOLUME = "hf-cache"
HF_CACHE_MOUNT = "/mnt/hf-cache"
HF_CACHE_PREFIX = "hf-cache"
MANAGED_LABEL = ("managed-by", "tuneplane")

# Cloud Run's minimum CPU and memory for one GPU of each type.
GPU_RESOURCES: dict[str, tuple[str, str]] = {
    "nvidia-l4": ("4", "16Gi"),
    "nvidia-rtx-pro-6000": ("20", "80Gi"),
}
GPU_JOB_SUFFIX: dict[str, str] = {"nvidia-l4": "l4", "nvidia-rtx-pro-6000": "rtx-pro-6000"}
assert set(GPU_RESOURCES) == set(GPU_TYPES) == set(GPU_JOB_SUFFIX)
# Preview ("Pre-GA") features need the Job at launch stage BETA, or Cloud Run refuses it:
# https://cloud.google.com/run/docs/configuring/jobs/gpu marks the RTX PRO 6000 "Preview"; a
# GPU task timeout over 1 hour is "Long running GPU jobs" (api/dispatch/base.py, the caps).
PREVIEW_GPUS = frozenset({"nvidia-rtx-pro-6000"})

# Execution names add ~6 characters to the Job's; Cloud Run caps names at 63.
_JOB_ID = re.compile(r"^[a-z](?:[a-z0-9-]{0,47}[a-z0-9])?$")
_SECRET = re.compile(
    r"^(?:projects/[^/]+/secrets/)?([A-Za-z0-9_-]+)(?:/versions/([A-Za-z0-9_-]+))?$"
)


class CloudRunConfigError(ValueError):
    """The settings cannot describe a Cloud Run Job; the message names what to set."""


def check_settings(settings: Settings) -> None:
    missing = [
        f"TUNEPLANE_{name.upper()}"
        for name in ("gcp_project", "trainer_image", "bucket")
        if not getattr(settings, name)
    ]
    if missing:
        raise CloudRunConfigError(
            f"TUNEPLANE_DISPATCHER=cloudrun needs {', '.join(missing)} (`deploy/deploy.sh` "
            "creates the project's pieces and sets them on the api service)"
        )
    for gpu in GPU_TYPES:
        job_id(settings, gpu)
    if settings.hf_token_secret and not _SECRET.match(settings.hf_token_secret):
        raise CloudRunConfigError(
            f"TUNEPLANE_HF_TOKEN_SECRET={settings.hf_token_secret!r} is not a secret name: use "
            "'NAME', 'projects/P/secrets/NAME' or 'projects/P/secrets/NAME/versions/V'"
        )
    if settings.vpc_subnet and not settings.vpc_network:
        raise CloudRunConfigError("TUNEPLANE_VPC_SUBNET needs TUNEPLANE_VPC_NETWORK as well")


def job_id(settings: Settings, gpu_type: str) -> str:
    value = f"{settings.cloud_run_job}-{GPU_JOB_SUFFIX[gpu_type]}"
    if not _JOB_ID.match(value):
        raise CloudRunConfigError(
            f"TUNEPLANE_CLOUD_RUN_JOB={settings.cloud_run_job!r} gives the Job name {value!r}: "
            "use lowercase letters, digits and hyphens, start with a letter, at most 36 characters"
        )
    return value


def location(settings: Settings) -> str:
    return f"projects/{settings.gcp_project}/locations/{settings.gcp_region}"


def job_name(settings: Settings, gpu_type: str) -> str:
    return f"{location(settings)}/jobs/{job_id(settings, gpu_type)}"


def run_prefix(settings: Settings, run_id: str) -> str:
    """`gs://BUCKET/runs/RUN_ID`: the run's artifacts; its checkpoints live under `/checkpoints`."""
    return f"gs://{settings.bucket}/runs/{run_id}"


def task_timeout_seconds(settings: Settings, segment_seconds: float) -> int:
    # The trainer stops at its deadline (the end of the segment); the margin covers the final
    # checkpoint and the upload, so a segment ends by itself before Cloud Run kills it.
    seconds = math.ceil(segment_seconds) + settings.cloud_run_timeout_margin_minutes * 60
    return min(seconds, max_task_seconds(settings))


def launch_stage(settings: Settings, gpu_type: str) -> int:
    preview = gpu_type in PREVIEW_GPUS or max_task_seconds(settings) > GPU_TASK_SECONDS_GA
    return launch_stage_pb2.LaunchStage.BETA if preview else launch_stage_pb2.LaunchStage.GA


def build_job(settings: Settings, gpu_type: str) -> run_v2.Job:
    """The Job's desired state (no name: create_job takes the id, update_job gets it set)."""
    check_settings(settings)
    task = run_v2.TaskTemplate(
        containers=[_container(settings, gpu_type)],
        volumes=_volumes(settings),
        max_retries=settings.cloud_run_max_retries,
        timeout=duration_pb2.Duration(
            seconds=task_timeout_seconds(
                settings, RunSpec.model_fields["time_budget_minutes"].default * 60
            )
        ),
        node_selector=run_v2.NodeSelector(accelerator=gpu_type),
        # Zonal redundancy reserves spare GPUs in other zones (and costs for it); a killed task
        # is retried and resumes from its checkpoint instead.
        gpu_zonal_redundancy_disabled=True,
    )
    if settings.trainer_service_account:
        task.service_account = settings.trainer_service_account
    if settings.vpc_network:
        task.vpc_access = _vpc_access(settings)
    return run_v2.Job(
        labels=dict([MANAGED_LABEL]),
        launch_stage=launch_stage(settings, gpu_type),
        template=run_v2.ExecutionTemplate(task_count=1, parallelism=1, template=task),
    )


def _container(settings: Settings, gpu_type: str) -> run_v2.Container:
    """The trainer container: its image, the GPU's CPU and memory, the Hub token from Secret
    Manager, and the model cache on the bucket (off the in-memory file system)."""
    cpu, memory = GPU_RESOURCES[gpu_type]
    env: list[run_v2.EnvVar] = []
    if settings.hf_token_secret:
        match = _SECRET.match(settings.hf_token_secret)
        assert match is not None  # check_settings said so
        secret = settings.hf_token_secret.split("/versions/")[0]
        env.append(
            run_v2.EnvVar(
                name="HF_TOKEN",
                value_source=run_v2.EnvVarSource(
                    secret_key_ref=run_v2.SecretKeySelector(
                        secret=secret, version=match.group(2) or "latest"
                    )
                ),
            )
        )
    env.append(run_v2.EnvVar(name="HF_HOME", value=HF_CACHE_MOUNT))
    return run_v2.Container(
        name=CONTAINER,
        image=settings.trainer_image,
        env=env,
        resources=run_v2.ResourceRequirements(
            limits={"cpu": cpu, "memory": memory, "nvidia.com/gpu": "1"}
        ),
        volume_mounts=[
            run_v2.VolumeMount(name=BUCKET_VOLUME, mount_path=BUCKET_MOUNT),
            run_v2.VolumeMount(name=HF_CACHE_VOLUME, mount_path=HF_CACHE_MOUNT),
        ],
    )


def _volumes(settings: Settings) -> list[run_v2.Volume]:
    """The bucket read-only (data sets), and its model-cache prefix writable."""
    return [
        run_v2.Volume(
            name=BUCKET_VOLUME,
            gcs=run_v2.GCSVolumeSource(bucket=settings.bucket, read_only=True),
        ),
        run_v2.Volume(
            name=HF_CACHE_VOLUME,
            gcs=run_v2.GCSVolumeSource(
                bucket=settings.bucket,
                read_only=False,
                mount_options=[f"only-dir={HF_CACHE_PREFIX}"],
            ),
        ),
    ]


def _vpc_access(settings: Settings) -> run_v2.VpcAccess:
    egress = run_v2.VpcAccess.VpcEgress
    return run_v2.VpcAccess(
        network_interfaces=[
            run_v2.VpcAccess.NetworkInterface(
                network=settings.vpc_network or "", subnetwork=settings.vpc_subnet or ""
            )
        ],
        egress=egress.ALL_TRAFFIC
        if settings.vpc_egress == "all-traffic"
        else egress.PRIVATE_RANGES_ONLY,
    )


def trainer_args(spec: RunSpec, settings: Settings, run_id: str) -> list[str]:
    """The trainer's command line: the spec's flags plus where its output goes (the same flags
    the original script took, so the container also runs by hand). `--device cuda`: a task that
    comes up without its GPU fails at once instead of training for hours on the CPU."""
    return [
        *spec.to_flags(),
        "--output-dir",
        LOCAL_OUTPUT_DIR,
        "--gcs-output-path",
        run_prefix(settings, run_id),
        "--device",
        "cuda",
    ]


def build_overrides(
    spec: RunSpec, settings: Settings, env: ExecutionEnv, now: datetime
) -> run_v2.RunJobRequest.Overrides:
    """Only what Overrides can carry (job.proto: container args and env, task_count, timeout),
    for the container by the name the Job gives it (a name matching no container is refused)."""
    assert env.run_id is not None and env.deadline is not None
    segment = (env.deadline - now).total_seconds()
    return run_v2.RunJobRequest.Overrides(
        container_overrides=[
            run_v2.RunJobRequest.Overrides.ContainerOverride(
                name=CONTAINER,
                args=trainer_args(spec, settings, env.run_id),
                env=[run_v2.EnvVar(name=k, value=v) for k, v in sorted(env.as_environ().items())],
            )
        ],
        task_count=1,
        timeout=duration_pb2.Duration(seconds=task_timeout_seconds(settings, segment)),
    )


def managed_view(job: run_v2.Job) -> dict[str, Any]:
    """The fields this module sets, normalised, so that a Job read back from Cloud Run (with the
    server's defaults and output-only fields filled in) compares equal to the one we built."""
    task = job.template.template
    container = task.containers[0] if task.containers else run_v2.Container()
    limits = dict(container.resources.limits)
    vpc = None
    if task.vpc_access.network_interfaces:
        nic = task.vpc_access.network_interfaces[0]
        vpc = (nic.network, nic.subnetwork, run_v2.VpcAccess.VpcEgress(task.vpc_access.egress).name)
    return {
        # Overrides name the container: a Job whose container has another name (or none, as
        # `gcloud run jobs deploy` without `--container` leaves it) is brought in line first.
        "container": container.name,
        "image": container.image,
        "cpu": limits.get("cpu"),
        "memory": limits.get("memory"),
        "gpus": limits.get("nvidia.com/gpu"),
        "accelerator": task.node_selector.accelerator,
        "gpu_zonal_redundancy_disabled": task.gpu_zonal_redundancy_disabled,
        "timeout_seconds": task.timeout.seconds,
        "max_retries": task.max_retries,
        # An unset service account becomes the project's default one on the server.
        "service_account": task.service_account or None,
        "env": sorted(
            (
                e.name,
                e.value,
                e.value_source.secret_key_ref.secret.split("/")[-1],
                e.value_source.secret_key_ref.version,
            )
            for e in container.env
        ),
        "volumes": sorted(
            (v.name, v.gcs.bucket, v.gcs.read_only, tuple(v.gcs.mount_options))
            for v in task.volumes
        ),
        "mounts": sorted((m.name, m.mount_path) for m in container.volume_mounts),
        "vpc": vpc,
        "task_count": job.template.task_count,
        "label": job.labels.get(MANAGED_LABEL[0]),
    }


def same_template(live: run_v2.Job, desired: run_v2.Job) -> bool:
    want = managed_view(desired)
    have = managed_view(live)
    if want["service_account"] is None:
        have["service_account"] = None
    return have == want
