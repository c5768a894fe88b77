"""The database tables and the api's request/response models."""

from api.models.events import RunEvent, RunEventPublic
from api.models.idempotency import IdempotencyKey
from api.models.metrics import ClassMetric, Evaluation, ProgressPoint
from api.models.notifications import WebhookDelivery
from api.models.runs import RetrainRequest, Run, RunCreate, RunPublic, RunsPage, RunTag
from api.models.templates import Champion, RunTemplate, TemplateVersion
from api.models.tokens import ApiToken

__all__ = [
    "ApiToken",
    "Champion",
    "ClassMetric",
    "Evaluation",
    "IdempotencyKey",
    "ProgressPoint",
    "RetrainRequest",
    "Run",
    "RunCreate",
    "RunEvent",
    "RunEventPublic",
    "RunPublic",
    "RunTag",
    "RunTemplate",
    "RunsPage",
    "TemplateVersion",
    "WebhookDelivery",
]
