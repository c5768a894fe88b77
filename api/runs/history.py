"""The dashboard's history: per model and data set, the results of recent finished runs.

It reads a bounded number of recent runs per model and data set through the `status` and
`model_id` indexes, so it stays fast with many runs (the filters' planning rule, SELECTIVE, is
api/runs/query.py's).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from api.runs.models import Run
from api.runs.query import SELECTIVE, count_runs, unindexed
from api.runs.states import RunStatus

HISTORY_PER_GROUP = 60
HISTORY_GROUPS = 6


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
    succeeded = count_runs(session, col(Run.status) == RunStatus.succeeded)
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
                unindexed(col(Run.status)) == RunStatus.succeeded,
                col(Run.final_accuracy).is_not(None),
                # Only the rows of the groups shown come back (compared unindexed, so the
                # walk stays on `created_at`).
                unindexed(col(Run.model_id)).in_({m for m, _ in common}),
                unindexed(col(Run.dataset)).in_({d for _, d in common}),
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
                unindexed(col(Run.status)) == RunStatus.succeeded,
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
