"""The fake Cloud Run refuses what real Cloud Run refuses (tests/fakes/cloudrun_rules.py cites
each rule), over the real client: what the dispatcher sent before issue 15 fails here, so a
dispatcher that regresses fails its tests instead of a first day in production."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from google.api.launch_stage_pb2 import LaunchStage
from google.api_core import exceptions as gexc
from google.cloud import run_v2
from google.protobuf import duration_pb2

from api.config import Settings
from api.dispatch import cloudrun_job as cj
from api.dispatch.cloudrun import make_clients
from tests.fakes import cloudrun_rules as rules
from tests.fakes.cloudrun import FakeCloudRun, Outcome

Overrides = run_v2.RunJobRequest.Overrides


@pytest.fixture
def jobs(cloud_settings: Callable[..., Settings]) -> Iterator[tuple[run_v2.JobsClient, Settings]]:
    s = cloud_settings()
    client, executions = make_clients(s)
    yield client, s
    client.transport.close()
    executions.transport.close()


def create(client: run_v2.JobsClient, s: Settings, gpu: str, job: run_v2.Job) -> str:
    client.create_job(parent=cj.location(s), job=job, job_id=cj.job_id(s, gpu)).result(timeout=30)
    return cj.job_name(s, gpu)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda j: setattr(j, "launch_stage", LaunchStage.GA), "preview feature"),
        (
            lambda j: j.template.template.containers[0].resources.limits.update({"cpu": "8"}),
            "at least 20 CPU",
        ),
        (
            lambda j: setattr(j.template.template, "timeout", duration_pb2.Duration(seconds=43500)),
            "out of range",
        ),
    ],
)
def test_an_rtx_pro_6000_job_needs_beta_its_minimums_and_a_timeout_within_12_hours(
    jobs: tuple[run_v2.JobsClient, Settings], change: Callable[[run_v2.Job], None], words: str
) -> None:
    client, s = jobs
    job = cj.build_job(
        s.model_copy(update={"cloud_run_long_gpu_tasks": True}), "nvidia-rtx-pro-6000"
    )
    change(job)
    with pytest.raises(gexc.InvalidArgument, match=words):
        create(client, s, "nvidia-rtx-pro-6000", job)


def test_overrides_may_not_pass_the_cap_nor_name_a_container_the_job_lacks(
    jobs: tuple[run_v2.JobsClient, Settings], fake_cloudrun: FakeCloudRun
) -> None:
    client, s = jobs
    name = create(client, s, "nvidia-l4", cj.build_job(s, "nvidia-l4"))  # GA: 1 hour at most
    fake_cloudrun.default_outcome = Outcome("manual")
    over = Overrides(timeout=duration_pb2.Duration(seconds=720 * 60 + 300))  # the old override
    # Over 1 hour is a preview feature the GA Job may not use (and over 12 h is out of range).
    with pytest.raises(gexc.InvalidArgument, match="preview feature"):
        client.run_job(request=run_v2.RunJobRequest(name=name, overrides=over))
    stranger = Overrides(container_overrides=[Overrides.ContainerOverride(name="sidecar")])
    with pytest.raises(gexc.InvalidArgument, match="no container named 'sidecar'"):
        client.run_job(request=run_v2.RunJobRequest(name=name, overrides=stranger))
    ok = Overrides(
        container_overrides=[Overrides.ContainerOverride(name="trainer", args=["--x"])],
        timeout=duration_pb2.Duration(seconds=3600),
    )
    client.run_job(request=run_v2.RunJobRequest(name=name, overrides=ok))
    (ex,) = fake_cloudrun.executions.values()
    assert list(ex.template.containers[0].args) == ["--x"]
    assert ex.max_retries == s.cloud_run_max_retries
    live = client.get_job(name=name)
    assert live.launch_stage == LaunchStage.GA  # on read: the least stable stage it needs


def test_an_unset_max_retries_means_three() -> None:
    assert rules.max_retries(run_v2.TaskTemplate()) == 3  # task_template.proto's default
    assert rules.max_retries(run_v2.TaskTemplate(max_retries=0)) == 0  # a set 0 is 0
