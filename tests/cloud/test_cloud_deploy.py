"""deploy/deploy.sh, run for real with a stand-in `gcloud` on PATH that records its calls: the
trainer Job it deploys must be the Job the api's dispatcher builds from the settings the script
gives the api service (else the api would rewrite it on the first run), and Dockerfile.api must
never install torch."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
from google.api.launch_stage_pb2 import LaunchStage
from google.cloud import run_v2
from google.protobuf import duration_pb2

from api.config import Settings
from api.dispatch import cloudrun_job as cj
from api.secrets import references

ROOT = Path(__file__).resolve().parents[2]
PROJECT_NUMBER = "123456789012"
CONNECTION = "tp-test:us-central1:tuneplane-db"

# In bash, not Python: the script calls it ~40 times. One call per line, arguments tab-separated.
FAKE_GCLOUD = f"""#!/usr/bin/env bash
(IFS=$'\\t'; echo "$*") >>"$GCLOUD_LOG"
[[ " $* " == *" --data-file=- "* ]] && cat >/dev/null
if [[ " $* " == *" describe "* ]]; then
  case " $* " in
    *"--format=value(connectionName)"*) echo "{CONNECTION}" ;;
    *"--format=value(projectNumber)"*) echo "{PROJECT_NUMBER}" ;;
    *) exit 1 ;;  # nothing exists yet: the script creates it
  esac
fi
# IAM shows the api's account on the trainer's at once (the script waits for it).
[[ " $* " == *" get-iam-policy "* ]] &&
  echo '"serviceAccount:tuneplane-api@tp-test.iam.gserviceaccount.com"'

exit 0
"""


def run_deploy(tmp_path: Path, **env: str) -> list[list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(FAKE_GCLOUD)
    gcloud.chmod(gcloud.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "gcloud.log"
    result = subprocess.run(
        ["bash", str(ROOT / "deploy" / "deploy.sh")],
        env={
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "HOME": str(tmp_path),
            "GCLOUD_LOG": str(log),
            "PROJECT_ID": "tp-test",
            "BUCKET": "tp-test-tuneplane",
            "HF_TOKEN": "hf_secret_value",
            "TAG": "v1",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=300,  # a hang guard
    )
    assert result.returncode == 0, result.stderr
    return [line.split("\t") for line in log.read_text().splitlines()]


def command(calls: list[list[str]], *words: str) -> list[str]:
    """The one call of `gcloud [beta] WORDS...`."""

    def named(c: list[str]) -> list[str]:
        positional = [a for a in c if not a.startswith("-")]
        return positional[1:] if positional[:1] == ["beta"] else positional

    found = [c for c in calls if named(c)[: len(words)] == list(words)]
    assert len(found) == 1, f"expected one `gcloud {' '.join(words)}`, got {found}"
    return found[0]


def flags(argv: list[str]) -> dict[str, str]:
    out = {}
    for arg in argv:
        if arg.startswith("--"):
            name, _, value = arg[2:].partition("=")
            out[name] = value
    return out


def every(argv: list[str], name: str) -> list[str]:
    """All values of a flag gcloud takes more than once (`--add-volume`)."""
    return [a.partition("=")[2] for a in argv if a.partition("=")[0] == f"--{name}"]


def kv(text: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in text.split(","))


def job_from_gcloud(argv: list[str]) -> run_v2.Job:
    """What `gcloud run jobs deploy` makes of these flags, as a Cloud Run v2 Job."""
    f = flags(argv)
    env = []
    for item in f.get("set-secrets", "").split(","):
        name, _, ref = item.partition("=")
        secret, _, version = ref.partition(":")
        env.append(
            run_v2.EnvVar(
                name=name,
                value_source=run_v2.EnvVarSource(
                    secret_key_ref=run_v2.SecretKeySelector(secret=secret, version=version)
                ),
            )
        )
    for item in f.get("set-env-vars", "").split(","):
        name, _, value = item.partition("=")
        env.append(run_v2.EnvVar(name=name, value=value))
    volumes = [kv(v) for v in every(argv, "add-volume")]
    mounts = [kv(m) for m in every(argv, "add-volume-mount")]
    assert all(v["type"] == "cloud-storage" for v in volumes)
    # Flags after `--container` are that container's; the rest are the Job's.
    assert argv.index(f"--container={f['container']}") < argv.index(f"--image={f['image']}")
    task = run_v2.TaskTemplate(
        containers=[
            run_v2.Container(
                name=f["container"],
                image=f["image"],
                env=env,
                resources=run_v2.ResourceRequirements(
                    limits={"cpu": f["cpu"], "memory": f["memory"], "nvidia.com/gpu": f["gpu"]}
                ),
                volume_mounts=[
                    run_v2.VolumeMount(name=m["volume"], mount_path=m["mount-path"]) for m in mounts
                ],
            )
        ],
        volumes=[
            run_v2.Volume(
                name=v["name"],
                gcs=run_v2.GCSVolumeSource(
                    bucket=v["bucket"],
                    read_only=v.get("readonly") == "true",
                    mount_options=[o for o in v.get("mount-options", "").split(";") if o],
                ),
            )
            for v in volumes
        ],
        max_retries=int(f["max-retries"]),
        timeout=duration_pb2.Duration(seconds=int(f["task-timeout"].removesuffix("s"))),
        service_account=f["service-account"],
        node_selector=run_v2.NodeSelector(accelerator=f["gpu-type"]),
        gpu_zonal_redundancy_disabled="no-gpu-zonal-redundancy" in f,
    )
    if "network" in f:
        egress = run_v2.VpcAccess.VpcEgress
        task.vpc_access = run_v2.VpcAccess(
            network_interfaces=[
                run_v2.VpcAccess.NetworkInterface(
                    network=f["network"], subnetwork=f.get("subnet", "")
                )
            ],
            egress=egress.ALL_TRAFFIC
            if f["vpc-egress"] == "all-traffic"
            else egress.PRIVATE_RANGES_ONLY,
        )
    return run_v2.Job(
        # The `gcloud beta` track deploys at launch stage BETA (preview features allowed).
        launch_stage=LaunchStage.BETA if argv[2] == "beta" else LaunchStage.GA,
        labels=kv(f["labels"]),
        template=run_v2.ExecutionTemplate(task_count=int(f["tasks"]), template=task),
    )


def api_settings(calls: list[list[str]], tmp_path: Path) -> Settings:
    """The settings the script gives the api service: its env vars of the first deploy alone
    (Settings refuses cloudrun mode without a public URL, so the first revision must have it)."""
    deploy = flags(command(calls, "run", "deploy"))
    raw = deploy["set-env-vars"]
    assert raw.startswith("^|^")
    env = dict(item.split("=", 1) for item in raw[3:].split("|"))
    values: dict[str, Any] = {k.removeprefix("TUNEPLANE_").lower(): v for k, v in env.items()}
    assert set(values) <= set(Settings.model_fields), set(values) - set(Settings.model_fields)
    return Settings(data_dir=tmp_path / "data", **values)


@pytest.mark.parametrize(
    ("extra", "gpu"),
    [
        ({}, "nvidia-l4"),
        (
            {
                "GPU_TYPE": "nvidia-rtx-pro-6000",
                "VPC_NETWORK": "default",
                "VPC_SUBNET": "default",
                "VPC_EGRESS": "all-traffic",
                "MAX_RETRIES": "5",
            },
            "nvidia-rtx-pro-6000",
        ),
    ],
)
def test_the_deployed_job_is_the_job_the_dispatcher_builds(
    tmp_path: Path, extra: dict[str, str], gpu: str
) -> None:
    calls = run_deploy(tmp_path, **extra)
    settings = api_settings(calls, tmp_path)
    job_deploy = command(calls, "run", "jobs", "deploy")
    positional = [a for a in job_deploy if not a.startswith("-")]
    assert positional[positional.index("deploy") + 1] == cj.job_id(settings, gpu)
    deployed = job_from_gcloud(job_deploy)
    built = cj.build_job(settings, gpu)
    assert cj.managed_view(deployed) == cj.managed_view(built)
    assert cj.same_template(deployed, built)
    assert deployed.launch_stage == built.launch_stage  # the right gcloud track
    assert settings.public_url == f"https://tuneplane-api-{PROJECT_NUMBER}.us-central1.run.app"
    assert settings.callback_auth == "oidc"
    # The api's secrets are Secret Manager references, never values in its environment.
    assert set(references(settings)) == {"callback_signing_key", "database_url"}
    assert "hf_secret_value" not in json.dumps(calls)


def test_the_script_creates_every_piece_of_the_guide(tmp_path: Path) -> None:
    calls = run_deploy(tmp_path, REGION="europe-west1")
    assert "--location=europe-west1" in command(calls, "storage", "buckets", "create")
    command(calls, "artifacts", "repositories", "create")
    builds = [
        c
        for c in calls
        if c[:2] == ["--project=tp-test", "--quiet"] and c[2:4] == ["builds", "submit"]
    ]
    assert len(builds) == 2
    accounts = [c[5] for c in calls if c[2:5] == ["iam", "service-accounts", "create"]]
    assert accounts == ["tuneplane-trainer", "tuneplane-api"]
    secrets = [c[4] for c in calls if c[2:4] == ["secrets", "create"]]
    assert secrets == ["hf-token", "tuneplane-signing-key", "tuneplane-database-url"]
    sql = command(calls, "sql", "instances", "create")
    assert "--database-version=POSTGRES_16" in sql
    service = command(calls, "run", "deploy")
    assert f"--add-cloudsql-instances={CONNECTION}" in service
    assert "--no-cpu-throttling" in service  # the dispatch worker runs between requests
    roles = {
        (c[c.index("add-iam-policy-binding") + 1 :][0] if c[2] != "projects" else "project",
         flags(c)["member"], flags(c)["role"])
        for c in calls if "add-iam-policy-binding" in c
    }  # fmt: skip
    api = "serviceAccount:tuneplane-api@tp-test.iam.gserviceaccount.com"
    trainer = "serviceAccount:tuneplane-trainer@tp-test.iam.gserviceaccount.com"
    assert ("project", api, "roles/run.developer") in roles
    assert (
        "tuneplane-trainer@tp-test.iam.gserviceaccount.com",
        api,
        "roles/iam.serviceAccountUser",
    ) in roles
    assert ("hf-token", trainer, "roles/secretmanager.secretAccessor") in roles
    assert ("gs://tp-test-tuneplane", trainer, "roles/storage.objectAdmin") in roles
    build = f"serviceAccount:{PROJECT_NUMBER}-compute@developer.gserviceaccount.com"
    for role in ("roles/artifactregistry.writer", "roles/storage.objectViewer"):
        assert ("project", build, role) in roles  # Cloud Build pushes the images
    # The Job is deployed only once IAM shows the api may act as the trainer.
    names = [" ".join(a for a in c if not a.startswith("-")) for c in calls]
    waited = max(i for i, n in enumerate(names) if "get-iam-policy" in n)
    deployed = min(i for i, n in enumerate(names) if "jobs deploy" in n)
    assert waited < deployed


def test_the_script_refuses_to_start_without_its_settings(tmp_path: Path) -> None:
    result = subprocess.run(
        ["bash", str(ROOT / "deploy" / "deploy.sh")],
        env={"PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=300,  # a hang guard
    )
    assert result.returncode != 0
    assert "set PROJECT_ID" in result.stderr


def test_dockerfile_api_never_installs_torch() -> None:
    text = (ROOT / "Dockerfile.api").read_text()
    installs = [line for line in text.splitlines() if "pip install" in line]
    assert installs, "Dockerfile.api installs the api with pip"
    assert not any("torch" in line or "[trainer" in line or ".[" in line for line in installs)
    assert "find_spec('torch')" in text  # the build itself fails if torch sneaks in
