"""Every table, imported in one place so that `SQLModel.metadata` is complete: the migrations
environment compares it with the database, and tests create or inspect the schema from it."""

from api.auth.models import ApiToken
from api.dispatch.models import ExecutionStop
from api.events.models import ClassMetric, Evaluation, ProgressPoint, RunEvent
from api.notify.models import WebhookDelivery
from api.runs.idempotency import IdempotencyKey
from api.runs.models import Run, RunTag
from api.templates.models import Champion, RunTemplate, TemplateVersion

__all__ = [
    "ApiToken",
    "Champion",
    "ClassMetric",
    "Evaluation",
    "ExecutionStop",
    "IdempotencyKey",
    "ProgressPoint",
    "Run",
    "RunEvent",
    "RunTag",
    "RunTemplate",
    "TemplateVersion",
    "WebhookDelivery",
]
