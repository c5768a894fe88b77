"""The rules the fake Cloud Run applies to Jobs and RunJob overrides, each with its source.

Sources (read 2026-12-03):
- [job.proto] googleapis/googleapis google/cloud/run/v2/job.proto @ f8291d2 (Overrides,
  Job.launch_stage), as in google/cloud/run_v2/types/job.py of the installed client.
- [task_template.proto] the same commit: `oneof retries { int32 max_retries = 3; }` "Defaults to
  3", `timeout` "applies per attempt of a task ... Defaults to 600 seconds".
- [execution.proto], [condition.proto] the same commit: task counts, conditions, reasons.
- [timeout doc] https://cloud.google.com/run/docs/configuring/task-timeout: "up to 168 hours";
  "For tasks using GPUs, the maximum available timeout is 1 hour" (GA page) and "12 hours
  (preview)" under "Preview — Long running GPU jobs" (current page).
- [gpu doc] https://cloud.google.com/run/docs/configuring/jobs/gpu: "NVIDIA RTX PRO 6000 Blackwell
  GPU ... (Preview)"; "For L4 GPUs, you must use a minimum of 4 CPU and 16 GiB of memory"; "For
  NVIDIA RTX PRO 6000 Blackwell GPU, you must use a minimum of 20 CPU and 80 GiB of memory";
  "You can configure one GPU per Cloud Run instance".
- [launch stage] job.proto's Job.launch_stage: "Set the launch stage to a preview stage on input to
  allow use of preview features in that stage. On read (or output), describes whether the
  resource uses preview features."
"""

from __future__ import annotations

import re

from google.api import launch_stage_pb2
from google.cloud import run_v2

Stage = launch_stage_pb2.LaunchStage
GA_STAGES = (Stage.LAUNCH_STAGE_UNSPECIFIED, Stage.GA)  # "If no value is specified, GA is assumed"
PREVIEW_STAGES = (Stage.BETA, Stage.ALPHA)

# [gpu doc] minimum vCPU and GiB per GPU type; RTX PRO 6000 is itself a preview feature.
GPU_MINIMUMS = {"nvidia-l4": (4.0, 16.0), "nvidia-rtx-pro-6000": (20.0, 80.0)}
PREVIEW_GPUS = frozenset({"nvidia-rtx-pro-6000"})
GPU_TIMEOUT_GA = 3600  # [timeout doc] GA page
GPU_TIMEOUT_PREVIEW = 12 * 3600  # [timeout doc] "Long running GPU jobs" preview
TIMEOUT_MAX = 168 * 3600  # [timeout doc] any task
DEFAULT_TIMEOUT = 600  # [task_template.proto]
DEFAULT_MAX_RETRIES = 3  # [task_template.proto]
MAX_RETRIES_MAX = 10  # `gcloud run jobs deploy --max-retries` takes 0-10; not in the proto
# RFC 1123 DNS label: the proto calls container names a DNS_LABEL.
_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?$")
_UNIT = {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
_UNIT.update({"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12})


class Rejected(Exception):
    """INVALID_ARGUMENT with this message."""


def max_retries(task: run_v2.TaskTemplate) -> int:
    # A oneof: unset means the documented default, not 0.
    return task.max_retries if "max_retries" in task else DEFAULT_MAX_RETRIES


def timeout_seconds(task: run_v2.TaskTemplate) -> float:
    return task.timeout.total_seconds() if "timeout" in task else float(DEFAULT_TIMEOUT)


def _gib(quantity: str) -> float:
    match = _QUANTITY.match(quantity)
    if not match:
        raise Rejected(f"memory limit {quantity!r} is not a quantity")
    return float(match.group(1)) * _UNIT[match.group(2)] / 2**30


def preview_features(task: run_v2.TaskTemplate) -> list[str]:
    """The preview features a task template uses ([gpu doc], [timeout doc])."""
    used = []
    accelerator = task.node_selector.accelerator
    if accelerator in PREVIEW_GPUS:
        used.append(f"GPU type {accelerator}")
    if accelerator and timeout_seconds(task) > GPU_TIMEOUT_GA:
        used.append("a GPU task timeout over 1 hour")
    return used


def check_timeout(task: run_v2.TaskTemplate, stage: int) -> None:
    seconds = timeout_seconds(task)
    cap = TIMEOUT_MAX
    if task.node_selector.accelerator:
        cap = GPU_TIMEOUT_PREVIEW if stage in PREVIEW_STAGES else GPU_TIMEOUT_GA
    if seconds <= 0 or seconds > cap:
        raise Rejected(
            f"spec.template.spec.timeoutSeconds: {seconds:.0f}s is out of range (at most {cap}s "
            f"at launch stage {Stage.Name(stage)})"
        )


def check_stage(task: run_v2.TaskTemplate, stage: int) -> None:
    if stage in GA_STAGES and (used := preview_features(task)):
        raise Rejected(
            f"{', '.join(used)}: a preview feature; set the Job's launch_stage to BETA to use it"
        )


def check_job(job: run_v2.Job) -> None:
    """CreateJob / UpdateJob validation."""
    task = job.template.template
    if len(task.containers) != 1 or not task.containers[0].image:
        # One container: the fake models no sidecars (the trainer Job has none).
        raise Rejected("spec.template.spec.containers: exactly one container with an image")
    container = task.containers[0]
    if container.name and not _DNS_LABEL.match(container.name):
        raise Rejected(f"container name {container.name!r} is not a DNS label")
    retries = max_retries(task)
    if not 0 <= retries <= MAX_RETRIES_MAX:
        raise Rejected(f"max_retries {retries} is out of range 0-{MAX_RETRIES_MAX}")
    stage = job.launch_stage
    check_stage(task, stage)
    check_timeout(task, stage)
    limits = container.resources.limits
    accelerator = task.node_selector.accelerator
    if not accelerator:
        return
    if accelerator not in GPU_MINIMUMS:
        raise Rejected(f"unknown GPU {accelerator}")
    if limits.get("nvidia.com/gpu") != "1":
        raise Rejected("a GPU needs nvidia.com/gpu: 1 (one GPU per instance)")
    cpu, mem = GPU_MINIMUMS[accelerator]
    if float(limits.get("cpu", "1")) < cpu or _gib(limits.get("memory", "512Mi")) < mem:
        raise Rejected(f"{accelerator} needs at least {cpu:g} CPU and {mem:g}Gi memory")


def apply_overrides(
    job: run_v2.Job, overrides: run_v2.RunJobRequest.Overrides
) -> run_v2.TaskTemplate:
    """The task template of one execution: the Job's, with RunJob's overrides applied as
    [job.proto] describes them. Overrides carry only container args/env, task_count and timeout
    (the message has no other field: resources, image, GPU are the Job's)."""
    template = run_v2.TaskTemplate(job.template.template)
    names = [c.name for c in template.containers]
    for override in overrides.container_overrides:
        # A named override must name a container of the Job. An unnamed one is taken to mean
        # the only container (what `gcloud run jobs execute` without `--container` sends);
        # that reading is not stated in the proto, which only calls the name a DNS_LABEL.
        if override.name:
            if override.name not in names:
                raise Rejected(
                    f"overrides.containerOverrides: no container named {override.name!r} in "
                    f"the Job (its containers: {names})"
                )
            container = template.containers[names.index(override.name)]
        elif len(names) == 1:
            container = template.containers[0]
        else:
            raise Rejected("overrides.containerOverrides: name the container to override")
        if override.args or override.clear_args:
            container.args = list(override.args)  # "Will replace existing args"
        env = {e.name: e for e in container.env}
        env.update({e.name: e for e in override.env})  # "Will be merged with existing env"
        container.env = list(env.values())
    if overrides.task_count < 0:
        raise Rejected("overrides.taskCount must not be negative")
    if "timeout" in overrides:
        template.timeout = overrides.timeout  # "Will replace existing timeout_seconds value"
    # The override may not reach past what the Job's launch stage allows. The docs do not say
    # RunJob re-checks this; the fake assumes it does, as the same template rules apply.
    check_stage(template, job.launch_stage)
    check_timeout(template, job.launch_stage)
    return template


def output_stage(job: run_v2.Job) -> int:
    """[launch stage] on read: BETA when preview features are used, else GA."""
    return Stage.BETA if preview_features(job.template.template) else Stage.GA
