"""The trainer Job and the per-run overrides, as built from settings and a run spec."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from google.api.launch_stage_pb2 import LaunchStage
from google.cloud import run_v2
from pydantic import ValidationError

from api.config import Settings
from api.dispatch import cloudrun_job as cj
from api.dispatch.base import segment_length
from tests.cloud.conftest import TRAINER_SA, cloud_values
from trainer.contract.execution import ExecutionEnv
from trainer.contract.spec import RunSpec


def settings(tmp_path: Path, **overrides: object) -> Settings:
    return Settings(**cloud_values(data_dir=tmp_path, **overrides))


@pytest.mark.parametrize(
    ("gpu", "cpu", "memory", "job_id"),
    [
        ("nvidia-l4", "4", "16Gi", "tuneplane-trainer-l4"),
        ("nvidia-rtx-pro-6000", "20", "80Gi", "tuneplane-trainer-rtx-pro-6000"),
    ],
)
def test_job_has_one_gpu_with_its_minimum_cpu_and_memory(
    tmp_path: Path, gpu: str, cpu: str, memory: str, job_id: str
) -> None:
    s = settings(tmp_path)
    job = cj.build_job(s, gpu)
    task = job.template.template
    (container,) = task.containers
    assert dict(container.resources.limits) == {
        "cpu": cpu,
        "memory": memory,
        "nvidia.com/gpu": "1",
    }
    assert task.node_selector.accelerator == gpu
    assert task.gpu_zonal_redundancy_disabled is True
    assert container.image == s.trainer_image
    assert cj.job_name(s, gpu) == f"projects/tp-test/locations/us-central1/jobs/{job_id}"
    assert job.template.task_count == 1


def test_job_template_carries_identity_secret_bucket_retries_and_timeout(tmp_path: Path) -> None:
    s = settings(tmp_path, cloud_run_max_retries=5, cloud_run_timeout_margin_minutes=4)
    task = cj.build_job(s, "nvidia-l4").template.template
    (container,) = task.containers
    assert task.service_account == TRAINER_SA
    assert task.max_retries == 5
    assert task.timeout.total_seconds() == (55 + 4) * 60
    hf, hf_home = container.env
    # The model cache is on the bucket, not on the in-memory file system.
    assert (hf_home.name, hf_home.value) == ("HF_HOME", "/mnt/hf-cache")
    assert hf.name == "HF_TOKEN" and not hf.value
    assert hf.value_source.secret_key_ref.secret == "hf-token"
    assert hf.value_source.secret_key_ref.version == "latest"
    assert [
        (v.name, v.gcs.bucket, v.gcs.read_only, list(v.gcs.mount_options)) for v in task.volumes
    ] == [
        ("bucket", "tp-artifacts", True, []),
        ("hf-cache", "tp-artifacts", False, ["only-dir=hf-cache"]),
    ]
    assert [(m.name, m.mount_path) for m in container.volume_mounts] == [
        ("bucket", "/mnt/bucket"),
        ("hf-cache", "/mnt/hf-cache"),
    ]
    assert not task.vpc_access.network_interfaces  # no VPC unless one is named


def test_secret_in_another_project_with_a_pinned_version(tmp_path: Path) -> None:
    s = settings(tmp_path, hf_token_secret="projects/other/secrets/hf/versions/3")
    hf, _ = cj.build_job(s, "nvidia-l4").template.template.containers[0].env
    assert hf.value_source.secret_key_ref.secret == "projects/other/secrets/hf"
    assert hf.value_source.secret_key_ref.version == "3"


def test_no_hf_token_secret_means_no_hf_token(tmp_path: Path) -> None:
    s = settings(tmp_path, hf_token_secret=None)
    env = cj.build_job(s, "nvidia-l4").template.template.containers[0].env
    assert [e.name for e in env] == ["HF_HOME"]


@pytest.mark.parametrize(
    ("egress", "expected"),
    [
        ("all-traffic", run_v2.VpcAccess.VpcEgress.ALL_TRAFFIC),
        ("private-ranges-only", run_v2.VpcAccess.VpcEgress.PRIVATE_RANGES_ONLY),
    ],
)
def test_direct_vpc_egress(tmp_path: Path, egress: str, expected: object) -> None:
    s = settings(tmp_path, vpc_network="default", vpc_subnet="default", vpc_egress=egress)
    vpc = cj.build_job(s, "nvidia-l4").template.template.vpc_access
    assert [(n.network, n.subnetwork) for n in vpc.network_interfaces] == [("default", "default")]
    assert vpc.egress == expected


def test_overrides_hold_the_spec_flags_the_env_and_the_segment_timeout(tmp_path: Path) -> None:
    s = settings(tmp_path)
    spec = RunSpec(model_id="google/gemma-3-4b-it", dataset="digits", time_budget_minutes=20)
    deadline = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
    env = ExecutionEnv(
        run_id="run_abc",
        callback_url="https://api.example/api/v1/runs/run_abc/events",
        callback_token="secret-token",
        artifact_uri="gs://tp-artifacts/runs/run_abc",
        checkpoint_uri="gs://tp-artifacts/runs/run_abc/checkpoints",
        deadline=deadline,
        segment=2,
    )
    overrides = cj.build_overrides(spec, s, env, now=deadline - timedelta(minutes=20))
    (container,) = overrides.container_overrides
    assert container.name == "trainer"
    args = list(container.args)
    assert args[: len(spec.to_flags())] == spec.to_flags()
    assert RunSpec.from_flags(args[: len(spec.to_flags())]) == spec
    assert args[len(spec.to_flags()) :] == [
        "--output-dir",
        "/tmp/tuneplane/output",
        "--gcs-output-path",
        "gs://tp-artifacts/runs/run_abc",
        "--device",
        "cuda",
    ]
    env_vars = {e.name: e.value for e in container.env}
    assert env_vars == env.as_environ()
    assert env_vars["TUNEPLANE_DEADLINE"] == deadline.isoformat()
    assert env_vars["TUNEPLANE_SEGMENT"] == "2"
    assert overrides.timeout.total_seconds() == (20 + 5) * 60
    assert overrides.task_count == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"gcp_project": None}, "TUNEPLANE_GCP_PROJECT"),
        ({"trainer_image": None, "bucket": None}, "TUNEPLANE_TRAINER_IMAGE, TUNEPLANE_BUCKET"),
        ({"cloud_run_job": "Trainer_Job"}, "lowercase letters, digits and hyphens"),
        ({"cloud_run_job": "t" * 40}, "at most 36 characters"),
        ({"hf_token_secret": "sm://x/y"}, "is not a secret name"),
        ({"vpc_subnet": "default"}, "TUNEPLANE_VPC_SUBNET needs TUNEPLANE_VPC_NETWORK"),
    ],
)
def test_settings_that_cannot_make_a_job_say_what_to_set(
    tmp_path: Path, overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(cj.CloudRunConfigError, match=message):
        cj.check_settings(settings(tmp_path, **overrides))


def test_a_job_read_back_with_server_defaults_counts_as_unchanged(tmp_path: Path) -> None:
    s = settings(tmp_path)
    desired = cj.build_job(s, "nvidia-l4")
    live = run_v2.Job(desired)
    # What the server adds: output-only fields, defaults, its own labels and annotations.
    live.name = cj.job_name(s, "nvidia-l4")
    live.generation = 7
    live.labels["cloud.googleapis.com/location"] = "us-central1"
    live.template.template.execution_environment = (
        run_v2.ExecutionEnvironment.EXECUTION_ENVIRONMENT_GEN2
    )
    live.template.template.containers[0].env[
        0
    ].value_source.secret_key_ref.secret = "projects/123456/secrets/hf-token"
    assert cj.same_template(live, desired)

    changed = run_v2.Job(live)
    changed.template.template.containers[0].image = "other:2"
    assert not cj.same_template(changed, desired)
    changed = run_v2.Job(live)
    changed.template.template.containers[0].resources.limits["memory"] = "8Gi"
    assert not cj.same_template(changed, desired)
    changed = run_v2.Job(live)
    changed.template.template.gpu_zonal_redundancy_disabled = False
    assert not cj.same_template(changed, desired)


# -- settings that would only fail once a trainer calls back: refused when the api starts --------


def test_cloudrun_without_a_public_url_is_refused_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default (loopback) would become every trainer's callback URL and the ID tokens'
    audience; on Cloud Run nothing reaches it. Explicitly set, it is taken (the tests' trainers
    run on this machine)."""
    values = cloud_values(data_dir=tmp_path)
    del values["public_url"]
    with pytest.raises(ValidationError, match="TUNEPLANE_PUBLIC_URL"):
        Settings(**values)
    # From the environment, as the api reads it at start.
    for name, value in values.items():
        monkeypatch.setenv(f"TUNEPLANE_{name.upper()}", str(value))
    with pytest.raises(ValidationError, match="TUNEPLANE_PUBLIC_URL") as info:
        Settings()
    assert "the URL trainers reach the api at" in str(info.value)
    monkeypatch.setenv("TUNEPLANE_PUBLIC_URL", "http://127.0.0.1:8000")
    assert Settings().public_url == "http://127.0.0.1:8000"


def test_oidc_callbacks_without_the_trainers_service_account_are_refused_at_start(
    tmp_path: Path,
) -> None:
    with pytest.raises(ValidationError, match="TUNEPLANE_TRAINER_SERVICE_ACCOUNT"):
        settings(tmp_path, callback_auth="oidc", trainer_service_account=None)
    # Token mode needs no account (the Job then runs as the project's default one).
    assert settings(tmp_path, trainer_service_account=None).callback_auth == "token"
    assert settings(tmp_path, callback_auth="oidc").trainer_service_account == TRAINER_SA


@pytest.mark.parametrize(
    ("gpu", "long_tasks", "stage", "cap"),
    [
        ("nvidia-l4", False, "GA", 3600),
        ("nvidia-l4", True, "BETA", 12 * 3600),
        ("nvidia-rtx-pro-6000", False, "BETA", 3600),  # the GPU itself is in Preview
        ("nvidia-rtx-pro-6000", True, "BETA", 12 * 3600),
    ],
)
def test_preview_features_set_the_launch_stage_and_the_timeout_never_passes_the_cap(
    tmp_path: Path, gpu: str, long_tasks: bool, stage: str, cap: int
) -> None:
    s = settings(tmp_path, cloud_run_long_gpu_tasks=long_tasks)
    job = cj.build_job(s, gpu)
    assert LaunchStage.Name(job.launch_stage) == stage
    assert job.template.template.timeout.total_seconds() <= cap
    # The longest budget RunSpec takes (720 min) becomes segments that each fit the cap.
    spec = RunSpec(model_id="google/gemma-3-4b-it", dataset="digits", time_budget_minutes=720)
    segment = segment_length(s, spec)  # what the worker gives the execution
    assert segment < timedelta(minutes=720)
    now = datetime(2030, 1, 1, tzinfo=UTC)
    env = ExecutionEnv(run_id="run_x", deadline=now + segment)
    overrides = cj.build_overrides(spec, s, env, now)
    assert overrides.timeout.total_seconds() == min(segment.total_seconds() + 300, cap)
    assert overrides.timeout.total_seconds() <= cap
