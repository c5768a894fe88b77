"""What the Cloud Run dispatcher makes of Cloud Run's answers: an execution's state from its
conditions and counts (execution.proto), and a failed call as the DispatchError the worker
acts on."""

from __future__ import annotations

import grpc
from google.api_core import exceptions as gexc
from google.cloud import run_v2

from api.config import Settings
from api.dispatch import cloudrun_job as cj
from api.dispatch.base import DispatchError, ExecutionStatus

TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.UNKNOWN,
    }
)
_Cond = run_v2.Condition


def dispatch_error(
    settings: Settings, what: str, err: gexc.GoogleAPICallError, gpu: str | None, attempts: int
) -> DispatchError:
    """The DispatchError the worker acts on, with what to fix in words."""
    s = settings
    code = err.grpc_status_code
    said = f"Cloud Run could not {what}: {describe(err)}"
    if code in TRANSIENT:
        return DispatchError("transient", f"{said} (after {attempts} attempts; will retry)")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return DispatchError(
            "quota",
            f"{said}. No {gpu or 'GPU'} is free in {s.gcp_region} now (out of stock, or "
            "the project's GPU quota is used up); the run stays queued and is tried again. "
            "If it lasts, ask for more Cloud Run GPU quota or lower TUNEPLANE_MAX_CONCURRENCY.",
        )
    if code == grpc.StatusCode.PERMISSION_DENIED:
        # Roles granted minutes ago (deploy.sh) may not apply yet: wait, within a bound.
        return DispatchError(
            "iam",
            f"{said}. If the roles were just granted, IAM may still be applying them; "
            f"otherwise give the api's service account roles/run.developer on project "
            f"{s.gcp_project} and roles/iam.serviceAccountUser on the trainer's service "
            f"account ({s.trainer_service_account or 'the default compute service account'})",
        )
    hint = {
        grpc.StatusCode.PERMISSION_DENIED: (
            f"give the api's service account roles/run.developer on project {s.gcp_project} "
            "and roles/iam.serviceAccountUser on the trainer's service account "
            f"({s.trainer_service_account or 'the default compute service account'})"
        ),
        grpc.StatusCode.NOT_FOUND: (
            f"check TUNEPLANE_GCP_PROJECT ({s.gcp_project}), TUNEPLANE_GCP_REGION "
            f"({s.gcp_region}) and that the Cloud Run Admin API is enabled"
        ),
        grpc.StatusCode.INVALID_ARGUMENT: (
            f"check TUNEPLANE_TRAINER_IMAGE ({s.trainer_image}), "
            "TUNEPLANE_TRAINER_SERVICE_ACCOUNT, TUNEPLANE_HF_TOKEN_SECRET, the VPC settings "
            f"and that {gpu or 'the GPU type'} is offered in {s.gcp_region}"
        ),
        grpc.StatusCode.UNAUTHENTICATED: (
            "the api has no valid Google credentials: on Cloud Run give the service a "
            "service account, elsewhere run `gcloud auth application-default login`"
        ),
        grpc.StatusCode.FAILED_PRECONDITION: "see the Job in the Cloud Run console",
    }.get(code, "see the Cloud Run console")
    return DispatchError("permanent", f"{said}. To fix: {hint}.")


def env_of(execution: run_v2.Execution) -> dict[str, str]:
    containers = execution.template.containers
    return {e.name: e.value for e in containers[0].env} if containers else {}


def is_live(execution: run_v2.Execution) -> bool:
    completed = {c.type_: c for c in execution.conditions}.get("Completed")
    return completed is None or completed.state not in (
        _Cond.State.CONDITION_SUCCEEDED,
        _Cond.State.CONDITION_FAILED,
    )


def is_ours(settings: Settings, execution_name: str) -> bool:
    """An execution of one of our Jobs: `{location}/jobs/{cloud_run_job}-{gpu}/executions/...`."""
    jobs = {cj.job_name(settings, gpu) for gpu in cj.GPU_JOB_SUFFIX}
    return execution_name.split("/executions/")[0] in jobs


def describe(err: gexc.GoogleAPICallError) -> str:
    code = err.grpc_status_code
    return f"{code.name if code else err.code} {err.message}".strip()


def execution_status(execution: run_v2.Execution) -> ExecutionStatus:
    """Map an execution's conditions to our states, with Cloud Run's own words when it ended
    badly ("Task ... failed with message: The container exited with a non-zero status of 137.",
    "The configured timeout was reached.", ...)."""
    conditions = {c.type_: c for c in execution.conditions}
    completed = conditions.get("Completed")
    if completed is not None and completed.state == _Cond.State.CONDITION_SUCCEEDED:
        return ExecutionStatus("succeeded")
    if completed is not None and completed.state == _Cond.State.CONDITION_FAILED:
        reason = _reason(completed)
        message = completed.message or "the execution failed"
        if reason:
            message = f"{message} ({reason})"
        if execution.retried_count:
            # "The number of tasks which have retried at least once" (execution.proto).
            message += "; the task had been retried"
        cancelled = (
            completed.execution_reason == _Cond.ExecutionReason.CANCELLED
            or execution.cancelled_count > 0
        )
        return ExecutionStatus("cancelled" if cancelled else "failed", message)
    if execution.running_count > 0:
        return ExecutionStatus("running")
    started = conditions.get("Started")
    if started is not None and started.state == _Cond.State.CONDITION_SUCCEEDED:
        return ExecutionStatus("running")
    return ExecutionStatus("pending")


def _reason(condition: run_v2.Condition) -> str | None:
    if condition.execution_reason:
        return _Cond.ExecutionReason(condition.execution_reason).name
    if condition.reason:
        return _Cond.CommonReason(condition.reason).name
    return None
