"""Reading a run's events (GET /api/v1/runs/{id}/events)."""

from __future__ import annotations

from sqlmodel import Session, col, select

from api.events.models import RunEvent, RunEventPublic
from api.runs.query import find_run
from api.runs.validation import invalid

MAX_EVENTS_PAGE = 1000


def list_events(
    session: Session, run_id: str, *, after_seq: int = -1, limit: int = 100
) -> list[RunEventPublic]:
    """A run's events ordered by (seq, received_at), those with `seq > after_seq`. A page never
    splits the events that share one `seq` (a retried task re-numbers its events), so passing
    the last event's `seq` as `after_seq` walks every event exactly once."""
    if not 1 <= limit <= MAX_EVENTS_PAGE:
        raise invalid("query.limit", f"must be between 1 and {MAX_EVENTS_PAGE} (got {limit})")
    find_run(session, run_id)
    order = (col(RunEvent.seq), col(RunEvent.received_at), col(RunEvent.id))
    base = select(RunEvent).where(RunEvent.run_id == run_id)
    rows = list(
        session.exec(base.where(RunEvent.seq > after_seq).order_by(*order).limit(limit + 1))
    )
    if len(rows) > limit:
        cut = rows[limit].seq
        page = [r for r in rows[:limit] if r.seq != cut]
        # One seq with more events than a page: return all of them rather than loop forever.
        rows = page or list(session.exec(base.where(RunEvent.seq == cut).order_by(*order)))
    return [RunEventPublic.model_validate(r, from_attributes=True) for r in rows]
