"""One run on the dashboard: its page, the fragments that keep an active run's page current,
and its log file when the log is local."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

from api.auth import csrf
from api.deps import SessionDep, SettingsDep
from api.runs import detail as detail_q
from api.runs import query as q
from api.web.pages import ENV, error_page, layout_context, not_found, render
from api.web.run_view import local_log_path, page_context, run_context

router = APIRouter(include_in_schema=False)

# Notices of this page's own actions (the shared ones are `dashboard.NOTICES`).
RUN_NOTICES = {"promoted": "Promoted: this run is now its template's champion."}

LIVE_PARTS = {
    "header": "_run_header.html",
    "progress": "_run_progress.html",
    "timeline": "_run_timeline.html",
    "results": "_run_results.html",
}


@router.get("/runs/{run_id}", response_class=HTMLResponse)
def run_page(
    request: Request, run_id: str, session: SessionDep, settings: SettingsDep
) -> HTMLResponse:
    detail = detail_q.run_detail(session, run_id)
    if detail is None:
        return not_found(request, run_id)
    context = page_context(request, session, detail, settings)
    notice = RUN_NOTICES.get(request.query_params.get("notice", ""))
    if notice:
        context["notice"] = notice
    return render(request, "run.html", **context)


@router.get("/runs/{run_id}/live")
def run_live(request: Request, run_id: str, session: SessionDep, settings: SettingsDep) -> Response:
    """What changes on an active run's page, as server-rendered (escaped) fragments: the page's
    script swaps them in place. `active: false` tells it to stop polling."""
    detail = detail_q.run_detail(session, run_id)
    if detail is None:
        return JSONResponse({"error": "run not found"}, status_code=404)
    ctx = run_context(request, detail, settings)
    # The fragments' forms post as if from the run's page itself.
    ctx.update(layout_context(request, f"/runs/{run_id}"), notice=None, page_error=None)
    html = {key: ENV.get_template(name).render(**ctx) for key, name in LIVE_PARTS.items()}
    body = {
        "status": detail.run.status,
        "active": ctx["active"],
        "last_step": detail.run.last_step,
        "total_steps": detail.run.total_steps,
        "html": html,
    }
    response = JSONResponse(body, headers={"Cache-Control": "no-store"})
    csrf.set_cookie(request, response)
    return response


@router.get("/runs/{run_id}/log")
def run_log(request: Request, run_id: str, session: SessionDep, settings: SettingsDep) -> Response:
    run = q.run_row(session, run_id)
    if run is None:
        return not_found(request, run_id)
    path = local_log_path(run, settings)
    if path is None:
        return error_page(
            request,
            404,
            "No local log",
            "This run's log is not a file in the api's data directory"
            + (f"; it is at {run.log_uri}" if run.log_uri else "; no log has been recorded yet")
            + ".",
        )
    # Plain text, never sniffed: a log full of model output must not render as a page.
    return FileResponse(
        path,
        media_type="text/plain; charset=utf-8",
        headers={
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "default-src 'none'",
        },
        content_disposition_type="inline",
        filename=f"{run_id}.log",
    )
