"""Reading runs: the one query module behind GET /api/v1/runs and the dashboard alike (filters,
the keyset cursor, tags, champions, one run; a run's events are api/events/query.py). Nothing
here writes: creating, cancelling and retraining runs go through `api.runs.service`. The
dashboard's history and run detail read through `api.runs.history` and `api.runs.detail`.

Keyset pagination: a cursor holds the sort keys of the last row of a page, (created_at, id), so
the next page is "strictly older than that row". New runs are newer than every cursor, so they
never shift a page that a client is walking, unlike OFFSET; and the `created_at` index serves
both the order and the range, so page 200 costs what page 1 costs.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, or_, tuple_
from sqlalchemy.orm import load_only
from sqlmodel import Session, col, select

from api.errors import Problem
from api.runs.models import TAG, Run, RunPublic, RunsPage, RunTag
from api.runs.states import RunStatus
from api.runs.validation import check_text, invalid
from api.templates.champions import champions_among

PAGE_SIZE = 50  # the dashboard's and the REST list's default
MAX_PAGE_SIZE = 200
MAX_CURSOR = 200
# What decoding something that is not a cursor of ours can raise (UnicodeDecodeError and
# json.JSONDecodeError are ValueErrors; RecursionError: JSON nested too deep).
_NOT_A_CURSOR = (ValueError, TypeError, OverflowError, binascii.Error, RecursionError)


# ---- one run ------------------------------------------------------------------------------------


def to_public(run: Run, tags: Iterable[str]) -> RunPublic:
    fields = {name: getattr(run, name) for name in RunPublic.model_fields if name != "tags"}
    return RunPublic.model_validate({**fields, "tags": sorted(tags)})


def find_run(session: Session, run_id: str) -> Run:
    """The run's row, or a 404 problem."""
    run = session.get(Run, run_id)
    if run is None:
        raise not_found(run_id)
    return run


def run_row(session: Session, run_id: str) -> Run | None:
    """The run's row, or None (the dashboard answers a missing run with its own page)."""
    return session.get(Run, run_id)


def get_run(session: Session, run_id: str) -> RunPublic:
    run = find_run(session, run_id)
    return to_public(run, tags_of(session, [run.id])[run.id])


def not_found(run_id: str) -> Problem:
    return Problem(404, "Run not found", f"there is no run with id {run_id!r}")


def tags_of(session: Session, run_ids: list[str]) -> dict[str, list[str]]:
    """{run id: its tags, sorted}; a run without tags maps to []."""
    out: dict[str, list[str]] = defaultdict(list)
    if not run_ids:
        return out
    rows = session.exec(
        select(RunTag.run_id, RunTag.tag)
        .where(col(RunTag.run_id).in_(run_ids))
        .order_by(col(RunTag.tag))
    )
    for run_id, tag in rows:
        out[run_id].append(tag)
    return out


# ---- filters ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunFilters:
    """Which runs a list shows: any of `statuses`, all of `tags`, and the rest exactly (`text`
    is a case-insensitive search of name, id, model, data set and notes)."""

    statuses: tuple[RunStatus, ...] = ()
    model: str | None = None
    tags: tuple[str, ...] = ()
    text: str | None = None
    dataset: str | None = None

    @classmethod
    def parse(
        cls,
        status: str | None,
        model: str | None,
        tag: str | None,
        text: str | None,
        dataset: str | None = None,
    ) -> RunFilters:
        """The dashboard's filter form: one status and one tag at most, text trimmed."""
        st = (status or "").strip() or None
        if st is not None and st not in RunStatus.__members__:
            raise invalid(
                "query.status", f"unknown status {st!r}: use one of {', '.join(RunStatus)}"
            )
        tag = (tag or "").strip()[:64] or None
        return cls(
            statuses=(RunStatus(st),) if st else (),
            model=(model or "").strip()[:300] or None,
            tags=(tag,) if tag else (),
            text=(text or "").strip()[:200] or None,
            dataset=(dataset or "").strip()[:500] or None,
        )

    @property
    def status(self) -> RunStatus | None:  # the dashboard's one status
        return self.statuses[0] if self.statuses else None

    @property
    def tag(self) -> str | None:  # the dashboard's one tag
        return self.tags[0] if self.tags else None

    @property
    def active(self) -> bool:
        return any((self.statuses, self.model, self.tags, self.text, self.dataset))

    def query_args(self) -> dict[str, str]:
        args = {
            "status": self.status,
            "model": self.model,
            "dataset": self.dataset,
            "tag": self.tag,
            "q": self.text,
        }
        return {k: str(v) for k, v in args.items() if v}


# ---- the cursor ---------------------------------------------------------------------------------


def encode_cursor(run: Run) -> str:
    raw = json.dumps([run.created_at.isoformat(), run.id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The (created_at, id) in `cursor`; a 422 problem for anything this module did not make."""
    try:
        if len(cursor) > MAX_CURSOR:
            raise ValueError("too long")
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, row_id = json.loads(raw)
        when = datetime.fromisoformat(created)
        if when.tzinfo is None or not isinstance(row_id, str) or not row_id:
            raise ValueError("not a cursor")
        # In UTC here, where a time near datetime's limits with an offset (9999-12-31T23:59-23:59)
        # overflows, rather than in the column type, where the OverflowError would be a 500.
        when = when.astimezone(UTC)
    except _NOT_A_CURSOR:
        raise Problem(
            422,
            "Invalid cursor",
            "this page link is damaged: a cursor must be a `next_cursor` value from an earlier "
            "page, unchanged",
            errors=[{"field": "query.cursor", "message": "not a cursor this api issued"}],
        ) from None
    return when, row_id


# ---- lists --------------------------------------------------------------------------------------


# A filter that keeps fewer than this share of the runs is looked up through its own index (and
# its few rows sorted); a filter that keeps more is applied while walking the `created_at`
# index newest first, which fills a page after a few dozen rows instead of fetching and sorting
# thousands. SQLite plans without statistics and would always take the filter's index.
SELECTIVE = 0.05


def unindexed(column: Any) -> Any:
    """`column || ''`: the same value, but no index on `column` can serve the comparison, so
    the planner walks the index that gives the order (see SELECTIVE)."""
    return column.concat("")


def _where(
    session: Session, filters: RunFilters, counts: dict[str, int] | None = None
) -> list[Any]:
    """The filters as SQL conditions. With `counts` (runs per status), for a page: each filter
    is written so that the cheaper of its own index and the `created_at` walk serves it.
    Without, for counting: each filter through its own index."""
    conds: list[Any] = []
    total = sum(counts.values()) if counts is not None else 0

    def selective(matches: int) -> bool:
        return counts is None or matches <= total * SELECTIVE

    if filters.statuses:
        n = sum(counts.get(s, 0) for s in filters.statuses) if counts is not None else 0
        column = col(Run.status) if selective(n) else unindexed(col(Run.status))
        conds.append(column.in_([RunStatus(s).value for s in filters.statuses]))
    if filters.model:
        n = 0 if counts is None else count_runs(session, col(Run.model_id) == filters.model)
        column = col(Run.model_id) if selective(n) else unindexed(col(Run.model_id))
        conds.append(column == filters.model)
    if filters.dataset:
        conds.append(col(Run.dataset) == filters.dataset)
    for tag in dict.fromkeys(filters.tags):
        tagged = select(RunTag.run_id).where(col(RunTag.tag) == tag)
        n = 0 if counts is None else _count_tagged(session, tag)
        if selective(n):
            conds.append(col(Run.id).in_(tagged))
        else:
            conds.append(tagged.where(col(RunTag.run_id) == col(Run.id)).exists())
    if filters.text:
        pattern = "%" + _like_escape(filters.text) + "%"
        # SQLite's LIKE ignores ASCII case already; its ILIKE would wrap both sides in lower(),
        # several times slower on a full scan. PostgreSQL needs ILIKE.
        sqlite = session.get_bind().dialect.name == "sqlite"
        columns = (col(Run.name), col(Run.id), col(Run.model_id), col(Run.dataset), col(Run.notes))
        conds.append(
            or_(
                *(
                    c.like(pattern, escape="\\") if sqlite else c.ilike(pattern, escape="\\")
                    for c in columns
                )
            )
        )
    return conds


def count_runs(session: Session, *conds: Any) -> int:
    return session.exec(select(func.count()).select_from(Run).where(*conds)).one()


def _count_tagged(session: Session, tag: str) -> int:
    return session.exec(
        select(func.count()).select_from(RunTag).where(col(RunTag.tag) == tag)
    ).one()


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def keyset_page(
    session: Session,
    conds: Sequence[Any],
    *,
    after: str | None = None,
    before: str | None = None,
    limit: int = PAGE_SIZE,
    columns: Sequence[Any] = (),
) -> tuple[list[Run], str | None, str | None]:
    """Newest first: (runs, cursor of the older page, cursor of the newer page). `after`: the
    page older than that cursor; `before`: the page newer. `columns`: load only those."""
    key = tuple_(col(Run.created_at), col(Run.id))
    stmt = select(Run).where(*conds)
    if columns:
        stmt = stmt.options(load_only(*columns))
    if before:
        stmt = stmt.where(key > tuple_(*decode_cursor(before)))
        stmt = stmt.order_by(col(Run.created_at).asc(), col(Run.id).asc())
    else:
        if after:  # an empty cursor is the first page (a shell loop's first `cursor=$NEXT`)
            stmt = stmt.where(key < tuple_(*decode_cursor(after)))
        stmt = stmt.order_by(col(Run.created_at).desc(), col(Run.id).desc())
    # One row more than a page tells whether another page follows, without counting.
    runs = list(session.exec(stmt.limit(limit + 1)).all())
    more = len(runs) > limit
    runs = runs[:limit]
    if before:
        runs.reverse()
        # Came from an older page, so an older page exists; a newer one only if rows were left.
        older = encode_cursor(runs[-1]) if runs else None
        newer = encode_cursor(runs[0]) if runs and more else None
    else:
        older = encode_cursor(runs[-1]) if runs and more else None
        newer = encode_cursor(runs[0]) if runs and after else None
    return runs, older, newer


def list_runs(
    session: Session,
    *,
    status: Sequence[RunStatus] = (),
    model: str | None = None,
    tags: Sequence[str] = (),
    limit: int = PAGE_SIZE,
    cursor: str | None = None,
) -> RunsPage:
    """GET /api/v1/runs. Newest first. `status`: any of them; `tags`: all of them; `cursor`:
    a page's `next_cursor`."""
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise invalid("query.limit", f"must be between 1 and {MAX_PAGE_SIZE} (got {limit})")
    if model is not None:
        check_text(model, "query.model", max_length=300)
    for tag in tags:
        if not TAG.match(tag):
            raise invalid("query.tag", f"{tag!r} is not a tag (letters, digits and _.:/=+-)")
    filters = RunFilters(statuses=tuple(status), model=model, tags=tuple(tags))
    runs, older, _ = keyset_page(session, _where(session, filters), after=cursor, limit=limit)
    tag_map = tags_of(session, [r.id for r in runs])
    return RunsPage(items=[to_public(r, tag_map[r.id]) for r in runs], next_cursor=older)


@dataclass
class RunRow:
    run: Run
    tags: list[str]
    champion_of: str | None = None  # the template whose current champion this run is

    @property
    def train_size(self) -> Any:
        return self.run.spec.get("train_size")

    @property
    def eval_size(self) -> Any:
        return self.run.spec.get("eval_size")


@dataclass
class RunsTable:
    """The dashboard's runs list: a page of rows and what the filter bar shows."""

    rows: list[RunRow]
    total: int
    older: str | None  # cursor of the next (older) page
    newer: str | None  # cursor of the previous (newer) page
    status_counts: dict[str, int]
    models: list[str]


def runs_table(
    session: Session,
    filters: RunFilters,
    *,
    after: str | None = None,
    before: str | None = None,
    limit: int = PAGE_SIZE,
) -> RunsTable:
    """The dashboard's list. Each filter is written so that the cheaper of its own index and
    the `created_at` walk serves it (see SELECTIVE)."""
    limit = max(1, min(limit, MAX_PAGE_SIZE))
    counts = status_counts(session)
    conds = _where(session, filters, counts)
    # Only what the table shows: notes (up to 10,000 characters) and the JSON bookkeeping
    # columns stay in the database.
    runs, older, newer = keyset_page(
        session, conds, after=after, before=before, limit=limit, columns=_LIST_COLUMNS
    )
    tags = tags_of(session, [r.id for r in runs])
    crowned = champions_among(session, [r.id for r in runs])
    total = (
        count_runs(session, *_where(session, filters)) if filters.active else sum(counts.values())
    )
    return RunsTable(
        rows=[RunRow(r, tags[r.id], crowned.get(r.id)) for r in runs],
        total=total,
        older=older,
        newer=newer,
        status_counts=counts,
        models=models(session),
    )


_LIST_COLUMNS: tuple[Any, ...] = (
    Run.id,
    Run.name,
    Run.status,
    Run.spec,
    Run.model_id,
    Run.dataset,
    Run.created_at,
    Run.updated_at,
    Run.started_at,
    Run.finished_at,
    Run.baseline_accuracy,
    Run.baseline_macro_f1,
    Run.final_accuracy,
    Run.final_macro_f1,
)


def status_counts(session: Session) -> dict[str, int]:
    rows = session.exec(select(Run.status, func.count()).group_by(col(Run.status)))
    return {str(status): n for status, n in rows}


def models(session: Session) -> list[str]:
    return list(session.exec(select(Run.model_id).distinct().order_by(col(Run.model_id))).all())
