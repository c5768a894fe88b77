"""The database tables and the api's request/response models."""

from api.models.events import RunEvent, RunEventPublic
from api.models.idempotency import IdempotencyKey
from api.models.metrics import ClassMetric, Evaluation, ProgressPoint
from api.models.runs import RetrainRequest, Run, RunCreate, RunPublic, RunsPage, RunTag

__all__ = [
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
    "RunsPage",
]
