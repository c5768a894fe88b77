"""Read queries behind the dashboard pages. Nothing here writes: creating, cancelling and
retraining runs go through `api.runs.service`, the same functions the REST API uses.

The runs list and the history are the pages people keep open, so they stay fast with many runs:
the list pages by keyset over (created_at, id) — the `created_at` index serves both the order and
the range, so page 200 costs what page 1 costs — and the history reads a bounded number of recent
runs per model and data set through the `status` and `model_id` indexes.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import and_, exists, func, or_, tuple_
from sqlalchemy import select as sa_select
from sqlalchemy.orm import aliased, load_only
from sqlmodel import Session, col, select

from api.events.models import ClassMetric, Evaluation, ProgressPoint, RunEvent
from api.runs.models import Run, RunTag
from api.runs.states import RunStatus
from api.templates.models import Champion, RunTemplate

PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
HISTORY_PER_GROUP = 60
HISTORY_GROUPS = 6
TIMELINE_EVENTS = 300


class BadQuery(ValueError):
    """A filter or cursor that cannot be used; the message says what to change."""


# ---- runs list --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunFilters:
    status: RunStatus | None = None
    model: str | None = None
    tag: str | None = None
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
        st = (status or "").strip() or None
        if st is not None and st not in RunStatus.__members__:
            raise BadQuery(f"unknown status {st!r}: use one of {', '.join(RunStatus)}")
        return cls(
            status=RunStatus(st) if st else None,
            model=(model or "").strip()[:300] or None,
            tag=(tag or "").strip()[:64] or None,
            text=(text or "").strip()[:200] or None,
            dataset=(dataset or "").strip()[:500] or None,
        )

    @property
    def active(self) -> bool:
        return any((self.status, self.model, self.tag, self.text, self.dataset))

    def query_args(self) -> dict[str, str]:
        args = {
            "status": self.status,
            "model": self.model,
            "dataset": self.dataset,
            "tag": self.tag,
            "q": self.text,
        }
        return {k: str(v) for k, v in args.items() if v}


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
class RunsPage:
    rows: list[RunRow]
    total: int
    older: str | None  # cursor of the next (older) page
    newer: str | None  # cursor of the previous (newer) page
    status_counts: dict[str, int]
    models: list[str]


def encode_cursor(run: Run) -> str:
    raw = json.dumps([run.created_at.isoformat(), run.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        at, run_id = json.loads(raw)
        when = datetime.fromisoformat(at)
        if when.tzinfo is None or not isinstance(run_id, str):
            raise ValueError
    except (ValueError, TypeError, binascii.Error, json.JSONDecodeError) as exc:
        raise BadQuery("this page link is damaged; start again from the first page") from exc
    return when, run_id


# A filter that keeps fewer than this share of the runs is looked up through its own index (and
# its few rows sorted); a filter that keeps more is applied while walking the `created_at`
# index newest first, which fills a page after a few dozen rows instead of fetching and sorting
# thousands. SQLite plans without statistics and would always take the filter's index.
SELECTIVE = 0.05


def _unindexed(column: Any) -> Any:
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

    if filters.status:
        n = counts.get(filters.status, 0) if counts is not None else 0
        column = col(Run.status) if selective(n) else _unindexed(col(Run.status))
        conds.append(column == filters.status)
    if filters.model:
        n = 0 if counts is None else _count(session, col(Run.model_id) == filters.model)
        column = col(Run.model_id) if selective(n) else _unindexed(col(Run.model_id))
        conds.append(column == filters.model)
    if filters.dataset:
        conds.append(col(Run.dataset) == filters.dataset)
    if filters.tag:
        tagged = select(RunTag.run_id).where(col(RunTag.tag) == filters.tag)
        n = 0 if counts is None else _count_tagged(session, filters.tag)
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


def _count(session: Session, *conds: Any) -> int:
    return session.exec(select(func.count()).select_from(Run).where(*conds)).one()


def _count_tagged(session: Session, tag: str) -> int:
    return session.exec(
        select(func.count()).select_from(RunTag).where(col(RunTag.tag) == tag)
    ).one()


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def list_runs(
    session: Session,
    filters: RunFilters,
    *,
    after: str | None = None,
    before: str | None = None,
    limit: int = PAGE_SIZE,
) -> RunsPage:
    """Newest first. `after`: the page older than that cursor; `before`: the page newer."""
    limit = max(1, min(limit, MAX_PAGE_SIZE))
    counts = status_counts(session)
    conds = _where(session, filters, counts)
    key = tuple_(col(Run.created_at), col(Run.id))
    # Only what the table shows: notes (up to 10,000 characters) and the JSON bookkeeping
    # columns stay in the database.
    stmt = select(Run).options(load_only(*_LIST_COLUMNS)).where(*conds)
    if before:
        stmt = stmt.where(key > tuple_(*decode_cursor(before)))
        stmt = stmt.order_by(col(Run.created_at).asc(), col(Run.id).asc())
    else:
        if after:
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
    tags = tags_of(session, [r.id for r in runs])
    crowned = champions_among(session, [r.id for r in runs])
    total = _count(session, *_where(session, filters)) if filters.active else sum(counts.values())
    return RunsPage(
        rows=[RunRow(r, tags.get(r.id, []), crowned.get(r.id)) for r in runs],
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


def tags_of(session: Session, run_ids: list[str]) -> dict[str, list[str]]:
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


def champions_among(session: Session, run_ids: list[str]) -> dict[str, str]:
    """{run id: template name} for those of `run_ids` that are their template's current
    champion, in one query whatever the number of runs or templates. The current champion is
    a template's newest promotion (api/services/templates.current_champion: latest
    `promoted_at`, then highest id), so a promotion row counts when no newer row of its
    template exists. A deleted (hidden) template has no champion to show."""
    if not run_ids:
        return {}
    newer = aliased(Champion)
    superseded = exists().where(
        col(newer.template_name) == col(Champion.template_name),
        or_(
            col(newer.promoted_at) > col(Champion.promoted_at),
            and_(
                col(newer.promoted_at) == col(Champion.promoted_at),
                col(newer.id) > col(Champion.id),
            ),
        ),
    )
    rows = session.exec(
        select(Champion.run_id, Champion.template_name)
        .join(RunTemplate, col(RunTemplate.name) == col(Champion.template_name))
        .where(
            col(Champion.run_id).in_(run_ids),
            col(RunTemplate.deleted_at).is_(None),
            ~superseded,
        )
    )
    return {run_id: template for run_id, template in rows}


def status_counts(session: Session) -> dict[str, int]:
    rows = session.exec(select(Run.status, func.count()).group_by(col(Run.status)))
    return {str(status): n for status, n in rows}


def models(session: Session) -> list[str]:
    return list(session.exec(select(Run.model_id).distinct().order_by(col(Run.model_id))).all())


# ---- history ----------------------------------------------------------------------------------


@dataclass
class HistoryRun:
    id: str
    name: str
    created_at: datetime
    finished_at: datetime | None
    baseline_accuracy: float | None
    baseline_macro_f1: float | None
    final_accuracy: float
    final_macro_f1: float | None

    @property
    def at(self) -> datetime:
        return self.finished_at or self.created_at

    @property
    def label(self) -> str:
        return f"{self.name} ({self.id})" if self.name else self.id


@dataclass
class HistoryGroup:
    model_id: str
    dataset: str
    count: int  # finished runs in the group; `runs` holds the newest HISTORY_PER_GROUP
    runs: list[HistoryRun] = field(default_factory=list)

    @property
    def best(self) -> HistoryRun | None:
        return max(self.runs, key=lambda r: r.final_accuracy, default=None)


@dataclass
class History:
    groups: list[HistoryGroup]
    more_groups: list[tuple[str, str, int]]  # (model, data set, runs) beyond the shown groups


# (database, model, data set, succeeded runs) -> the groups: see `_groups`.
_GROUPS: dict[tuple[str, str | None, str | None, int], list[tuple[str, str, int]]] = {}
_GROUPS_KEPT = 64


def _groups(session: Session, model: str | None, dataset: str | None) -> list[tuple[str, str, int]]:
    """(model, data set, succeeded runs) of every group, the most recently active first.

    Counting per group reads every succeeded run's row (no index holds the data set), tens of
    milliseconds with 10,000 runs, so the answer is kept and reused while the number of
    succeeded runs is unchanged. That number identifies the answer exactly: `succeeded` is
    final and a run's model and data set never change, so the set of succeeded runs only grows,
    and the count (read from the status index alone) changes whenever it does.
    """
    succeeded = _count(session, col(Run.status) == RunStatus.succeeded)
    key = (str(session.get_bind().engine.url), model, dataset, succeeded)
    cached = _GROUPS.get(key)
    if cached is not None:
        return cached
    conds = [col(Run.status) == RunStatus.succeeded]
    if model:
        conds.append(col(Run.model_id) == model)
    if dataset:
        conds.append(col(Run.dataset) == dataset)
    newest = func.max(col(Run.created_at))
    rows = session.exec(
        select(Run.model_id, Run.dataset, func.count(), newest)
        .where(*conds)
        .group_by(col(Run.model_id), col(Run.dataset))
        .order_by(newest.desc())
    ).all()
    groups = [(m, d, n) for m, d, n, _ in rows]
    if len(_GROUPS) >= _GROUPS_KEPT:
        _GROUPS.pop(next(iter(_GROUPS)))
    _GROUPS[key] = groups
    return groups


def history(
    session: Session,
    *,
    model: str | None = None,
    dataset: str | None = None,
    per_group: int = HISTORY_PER_GROUP,
    max_groups: int = HISTORY_GROUPS,
) -> History:
    groups = _groups(session, model, dataset)
    shown = [HistoryGroup(m, d, n) for m, d, n in groups[:max_groups]]
    finished = sum(n for _, _, n in groups)
    common = {(g.model_id, g.dataset): g for g in shown if g.count > finished * SELECTIVE}
    # Common groups: one walk down the `created_at` index, stopped as soon as each has its
    # newest `per_group` runs (a few hundred rows when the groups are evenly used).
    if common:
        walk: Any = (  # sqlmodel types selects of at most four columns
            sa_select(*_HISTORY_FIELDS, col(Run.model_id), col(Run.dataset))
            .where(
                _unindexed(col(Run.status)) == RunStatus.succeeded,
                col(Run.final_accuracy).is_not(None),
                # Only the rows of the groups shown come back (compared unindexed, so the
                # walk stays on `created_at`).
                _unindexed(col(Run.model_id)).in_({m for m, _ in common}),
                _unindexed(col(Run.dataset)).in_({d for _, d in common}),
            )
            .order_by(col(Run.created_at).desc())
            .execution_options(yield_per=100)
        )
        waiting = set(common)
        result = session.exec(walk)
        try:
            for *row, model_id, dataset in result:
                g = common.get((model_id, dataset))
                if g is None or len(g.runs) >= per_group:
                    continue
                g.runs.append(HistoryRun(*row))
                if len(g.runs) >= per_group:
                    waiting.discard((model_id, dataset))
                    if not waiting:
                        break
        finally:
            result.close()
    # Rare groups: through the model's index, the few rows sorted.
    for g in shown:
        if (g.model_id, g.dataset) in common:
            continue
        recent: Any = (
            sa_select(*_HISTORY_FIELDS)
            .where(
                _unindexed(col(Run.status)) == RunStatus.succeeded,
                col(Run.final_accuracy).is_not(None),
                col(Run.model_id) == g.model_id,
                col(Run.dataset) == g.dataset,
            )
            .order_by(col(Run.created_at).desc())
            .limit(per_group)
        )
        g.runs = [HistoryRun(*row) for row in session.exec(recent).all()]
    for g in shown:
        g.runs.reverse()  # oldest first, as the chart draws them
    return History(shown, groups[max_groups:])


_HISTORY_FIELDS: tuple[Any, ...] = (
    Run.id,
    Run.name,
    Run.created_at,
    Run.finished_at,
    Run.baseline_accuracy,
    Run.baseline_macro_f1,
    Run.final_accuracy,
    Run.final_macro_f1,
)


# ---- one run ----------------------------------------------------------------------------------


@dataclass
class RunDetail:
    run: Run
    tags: list[str]
    events: list[RunEvent]
    loss: list[tuple[int, float]]
    evaluations: dict[str, Evaluation]
    class_metrics: dict[str, list[ClassMetric]]
    parent: Run | None
    children: list[Run]
    champion_of: str | None = None  # the template whose current champion this run is

    @property
    def latest_progress(self) -> tuple[int, float] | None:
        return self.loss[-1] if self.loss else None


def get_run(session: Session, run_id: str) -> Run | None:
    return session.get(Run, run_id)


def run_detail(session: Session, run_id: str) -> RunDetail | None:
    run = session.get(Run, run_id)
    if run is None:
        return None
    # Progress events become ProgressPoints; the timeline shows the events that change state.
    events = list(
        session.exec(
            select(RunEvent)
            .where(col(RunEvent.run_id) == run_id, col(RunEvent.type) != "progress")
            .order_by(col(RunEvent.time), col(RunEvent.segment), col(RunEvent.seq))
            .limit(TIMELINE_EVENTS)
        ).all()
    )
    loss = [
        (step, loss)
        for step, loss in session.exec(
            select(ProgressPoint.step, ProgressPoint.loss)
            .where(col(ProgressPoint.run_id) == run_id, col(ProgressPoint.loss).is_not(None))
            .order_by(col(ProgressPoint.step))
        )
        if loss is not None
    ]
    evaluations = {
        e.stage: e
        for e in session.exec(select(Evaluation).where(col(Evaluation.run_id) == run_id)).all()
    }
    metrics: dict[str, list[ClassMetric]] = defaultdict(list)
    for m in session.exec(select(ClassMetric).where(col(ClassMetric.run_id) == run_id)).all():
        metrics[m.stage].append(m)
    parent = session.get(Run, run.parent_id) if run.parent_id else None
    children = list(
        session.exec(
            select(Run).where(col(Run.parent_id) == run_id).order_by(col(Run.created_at)).limit(20)
        ).all()
    )
    return RunDetail(
        run=run,
        tags=tags_of(session, [run_id]).get(run_id, []),
        events=events,
        loss=loss,
        evaluations=evaluations,
        class_metrics=dict(metrics),
        parent=parent,
        children=children,
        champion_of=champions_among(session, [run_id]).get(run_id) if run.template_name else None,
    )


# ---- compare ----------------------------------------------------------------------------------


@dataclass
class Comparison:
    runs: list[Run]
    spec_rows: list[tuple[str, list[Any], bool]]  # (field, value per run, differs)
    class_rows: list[tuple[str, list[float | None]]]  # (label, final F1 per run)


def compare(session: Session, run_ids: list[str]) -> tuple[Comparison | None, list[str]]:
    """The runs in the order asked for; the second value lists ids that do not exist."""
    found = {r.id: r for r in session.exec(select(Run).where(col(Run.id).in_(run_ids))).all()}
    missing = [i for i in run_ids if i not in found]
    if missing:
        return None, missing
    runs = [found[i] for i in run_ids]
    names: list[str] = []
    for r in runs:
        names += [k for k in r.spec if k not in names]
    spec_rows = []
    for name in names:
        values = [r.spec.get(name) for r in runs]
        spec_rows.append((name, values, any(v != values[0] for v in values)))
    f1: dict[str, dict[str, float]] = defaultdict(dict)
    for m in session.exec(
        select(ClassMetric).where(
            col(ClassMetric.run_id).in_(run_ids), col(ClassMetric.stage) == "final"
        )
    ).all():
        f1[m.label][m.run_id] = m.f1
    class_rows = [(label, [per_run.get(i) for i in run_ids]) for label, per_run in f1.items()]
    return Comparison(runs, spec_rows, class_rows), []
