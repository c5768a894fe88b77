"""The dashboard's pages across runs: the runs list, the history of results per model and data
set, and the side-by-side comparison of a few runs."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from api.deps import SessionDep
from api.errors import Problem
from api.runs import detail as detail_q
from api.runs import history as history_q
from api.runs import query as q
from api.runs.validation import invalid
from api.web import charts
from api.web.pages import error_page, render, split_list

router = APIRouter(include_in_schema=False)

MAX_COMPARE = 8


# ---- runs list --------------------------------------------------------------------------------


@router.get("/", response_class=HTMLResponse)
def runs_page(request: Request, session: SessionDep) -> HTMLResponse:
    p = request.query_params
    try:
        filters = q.RunFilters.parse(
            p.get("status"), p.get("model"), p.get("tag"), p.get("q"), p.get("dataset")
        )
        limit = _int_param(p.get("limit"), q.PAGE_SIZE, 1, q.MAX_PAGE_SIZE, "limit")
        page = q.runs_table(
            session, filters, after=p.get("after"), before=p.get("before"), limit=limit
        )
    except Problem as exc:  # a filter, limit or page link that cannot be used
        return error_page(request, 400, "Cannot list runs", exc.detail or exc.title)
    args = filters.query_args()
    if limit != q.PAGE_SIZE:
        args["limit"] = str(limit)
    return render(request, "runs.html", page=page, filters=filters, args=args)


def _int_param(raw: str | None, default: int, lo: int, hi: int, name: str) -> int:
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise invalid(f"query.{name}", f"{name} must be a whole number, got {raw!r}") from None
    if not lo <= value <= hi:
        raise invalid(f"query.{name}", f"{name} must be between {lo} and {hi}, got {value}")
    return value


# ---- history ----------------------------------------------------------------------------------


@router.get("/history", response_class=HTMLResponse)
def history_page(request: Request, session: SessionDep) -> HTMLResponse:
    model = request.query_params.get("model") or None
    dataset = request.query_params.get("dataset") or None
    hist = history_q.history(session, model=model, dataset=dataset)
    groups = []
    for g in hist.groups:
        acc = [
            charts.HistoryPoint(r.id, r.label, r.at, r.baseline_accuracy, r.final_accuracy)
            for r in g.runs
        ]
        f1 = [
            charts.HistoryPoint(r.id, r.label, r.at, r.baseline_macro_f1, r.final_macro_f1)
            for r in g.runs
            if r.final_macro_f1 is not None
        ]
        groups.append(
            {
                "group": g,
                "accuracy_chart": charts.history_chart(acc, metric="accuracy"),
                "f1_chart": charts.history_chart(f1, metric="macro F1"),
            }
        )
    return render(
        request, "history.html", groups=groups, more=hist.more_groups, model=model, dataset=dataset
    )


# ---- compare ----------------------------------------------------------------------------------


@router.get("/compare", response_class=HTMLResponse)
def compare_page(request: Request, session: SessionDep) -> HTMLResponse:
    ids: list[str] = []
    for raw in request.query_params.getlist("ids"):
        ids += [i for i in split_list(raw) if i not in ids]
    if len(ids) < 2 or len(ids) > MAX_COMPARE:
        message = (
            f"Pick between 2 and {MAX_COMPARE} runs to compare (got {len(ids)}): tick them on the "
            "runs page, or list their ids below."
        )
        status = 200 if not ids else 400
        return render(
            request, "compare.html", status, cmp=None, ids=ids, page_error=message if ids else None
        )
    cmp, missing = detail_q.compare(session, ids)
    if cmp is None:
        return render(
            request,
            "compare.html",
            404,
            cmp=None,
            ids=ids,
            page_error=f"No run with the id {', '.join(repr(m) for m in missing)}.",
        )
    rows = []
    for label, values in cmp.class_rows:
        ref = values[0]
        changes = [None if v is None or ref is None else v - ref for v in values]
        worst = min((c for c in changes[1:] if c is not None), default=None)
        rows.append({"label": label, "values": values, "changes": changes, "worst": worst})
    # Biggest drop first: a regression in one class is what a comparison is usually for.
    rows.sort(
        key=lambda r: (r["worst"] is None, r["worst"] if r["worst"] is not None else 0, r["label"])
    )
    differing = [r for r in cmp.spec_rows if r[2]]
    return render(request, "compare.html", cmp=cmp, ids=ids, class_rows=rows, differing=differing)
