"""Run templates (named run specs with quality gates), their versions, and champions.

A template is edited by adding a version, never by changing one: every run records the
(name, version) it came from, so what a run was asked to do stays answerable. Deleting a template
hides it (`deleted_at`) and keeps its versions and champions; re-creating the name continues its
version numbers, so a (name, version) pair never means two different specs.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, field_validator
from pydantic import Field as PField
from sqlalchemy import JSON, Column
from sqlmodel import Field, SQLModel

from api.db import UTCDateTime, utcnow
from api.runs.models import RunPublic
from api.templates.gates import Gates
from trainer.contract.spec import RunSpec


class RunTemplate(SQLModel, table=True):
    __tablename__ = "run_templates"

    name: str = Field(primary_key=True, max_length=100)
    version: int = Field(description="the current version")
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    deleted_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class TemplateVersion(SQLModel, table=True):
    __tablename__ = "run_template_versions"

    name: str = Field(foreign_key="run_templates.name", primary_key=True, max_length=100)
    version: int = Field(primary_key=True)
    description: str = Field(default="", max_length=2000)
    spec: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    gates: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    # [{"url": ..., "secret": ...}]: the secret signs deliveries, so it is kept (never returned).
    webhooks: list[dict[str, Any]] = Field(sa_column=Column(JSON, nullable=False))
    auto_promote: bool = False
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    created_by: str = Field(default="", max_length=100)


class Champion(SQLModel, table=True):
    """One promotion. The current champion of a template is its newest row; the rows before
    it are the champion history the dashboard shows."""

    __tablename__ = "champions"

    id: int | None = Field(default=None, primary_key=True)
    template_name: str = Field(foreign_key="run_templates.name", index=True, max_length=100)
    run_id: str = Field(foreign_key="runs.id", index=True, max_length=40)
    promoted_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    # "auto" (a passing run of an auto-promoting template) or the token name that promoted it.
    promoted_by: str = Field(default="", max_length=100)
    note: str = Field(default="", max_length=2000)


# ---- request and response bodies -----------------------------------------------------------

TEMPLATE_NAME = r"^[a-z0-9][a-z0-9._-]{0,49}$"
_NAME_RULE = "lowercase letters, digits and ._- only, starting with a letter or digit, 1-50 long"


class WebhookIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = PField(
        max_length=2000,
        pattern=r"^https?://[^\s/?#]+[^\s]*$",
        description="receives a signed JSON post when a run of this template ends; a URL as "
        "the api shows it (`https://host/…#k=1a2b3c4d`) keeps the webhook shown so, its whole "
        "URL and secret; a whole URL the template has keeps its secret",
    )
    secret: str | None = PField(
        None,
        min_length=16,
        max_length=200,
        description="HMAC-SHA256 key of `X-Tuneplane-Signature`; default: the server's "
        "TUNEPLANE_WEBHOOK_SECRET. Never returned",
    )

    @field_validator("url")
    @classmethod
    def _splits(cls, value: str) -> str:
        # The pattern admits what urllib cannot take apart ("http://a]b", a port over 65535);
        # the guard and the notifier split every URL, so such a one is refused here.
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises for a port that is not one
        except ValueError as exc:
            raise ValueError(f"is not a URL that can be sent to ({exc})") from None
        if not parts.hostname:
            raise ValueError("names no host")
        return value


class WebhookOut(BaseModel):
    url: str = PField(
        description="scheme and host only, `/…` where the rest is left out (a receiver's "
        "credential is often its path), and `#k=` with the hook's tag (8 hex digits of its "
        "URL's SHA-256); send it back as it is to keep that webhook"
    )
    has_own_secret: bool


class TemplateBody(BaseModel):
    """A template's content: what `PUT` replaces (making a new version)."""

    model_config = ConfigDict(extra="forbid")

    spec: RunSpec
    gates: Gates = PField(default_factory=Gates)
    webhooks: list[WebhookIn] = PField(default_factory=list, max_length=10)
    auto_promote: bool = PField(
        False, description="make each run that passes its gates the template's champion"
    )
    description: str = PField("", max_length=2000)


class TemplateCreate(TemplateBody):
    name: str = PField(pattern=TEMPLATE_NAME, description=_NAME_RULE)


class TemplateContent(BaseModel):
    """What one version of a template says, as the api shows it (secrets left out)."""

    name: str
    version: int
    description: str
    spec: dict[str, Any]
    gates: Gates
    webhooks: list[WebhookOut]
    auto_promote: bool
    created_at: datetime


class TemplatePublic(TemplateContent):
    updated_at: datetime
    version_created_by: str
    champion_run_id: str | None


class TemplateVersionPublic(TemplateContent):
    created_by: str


class CiContext(BaseModel):
    """Where a retrain came from; stored with the run and shown with it."""

    model_config = ConfigDict(extra="forbid")

    git_sha: str | None = PField(None, pattern=r"^[0-9a-fA-F]{7,64}$")
    pipeline_url: str | None = PField(None, max_length=2000, pattern=r"^https?://[^\s]+$")
    ref: str | None = PField(None, max_length=300, pattern=r"^[^\x00-\x1f]*$")
    repository: str | None = PField(None, max_length=300, pattern=r"^[^\x00-\x1f]*$")


class TemplateRunRequest(BaseModel):
    """Trigger a run of a template's current version."""

    model_config = ConfigDict(extra="forbid")

    overrides: dict[str, Any] = PField(
        default_factory=dict, description="spec fields that replace the template's"
    )
    ci: CiContext | None = None
    name: str | None = PField(None, max_length=200)
    tags: list[Annotated[str, PField(min_length=1, max_length=64)]] | None = PField(
        None, max_length=19
    )
    notes: str | None = PField(None, max_length=10_000)


class TemplateRunCreated(BaseModel):
    run_id: str
    template: str
    template_version: int
    url: str = PField(description="the run in the REST api")
    dashboard_url: str = PField(description="the run's dashboard page")
    run: RunPublic


class ChampionPublic(BaseModel):
    template_name: str
    run_id: str
    promoted_at: datetime
    promoted_by: str
    note: str
    current: bool
    final_accuracy: float | None
    final_macro_f1: float | None
    template_version: int | None


class PromoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    note: str = PField("", max_length=2000)
    force: bool = PField(
        False, description="promote even though the run's gate did not pass (say why in `note`)"
    )
