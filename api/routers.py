"""HTTP routes: `api_router` is everything under /api/v1; `pages_router` is the dashboard."""

from fastapi import APIRouter, Depends

from api.auth import routes as tokens
from api.auth.access import authorize, dashboard_access
from api.events import routes as callbacks
from api.notify import routes as deliveries
from api.runs import artifact_routes as artifacts
from api.runs import routes as runs
from api.templates import champion_routes as champions
from api.templates import routes as templates
from api.web import new_run, run_actions, run_page, runs_list, template_forms, template_pages

# Every route under /api/v1 is checked by `authorize` (api/auth/access.py decides the scope by
# method and path, so a route added later is covered without anyone remembering to protect it).
api_router = APIRouter(prefix="/api/v1", dependencies=[Depends(authorize)])
# The trainers' callbacks first: routes are matched in order, and a sweep's callbacks are most
# of the requests. (A GET of /runs/{id}/events passes them by method and goes on to runs.)
api_router.include_router(callbacks.router)
api_router.include_router(runs.router)
api_router.include_router(artifacts.router)
api_router.include_router(templates.router)
api_router.include_router(champions.router)
api_router.include_router(deliveries.router)
api_router.include_router(tokens.router)

# With auth on, every page needs a login session (api/auth/access.py); static files do not.
pages_router = APIRouter(include_in_schema=False, dependencies=[Depends(dashboard_access)])
pages_router.include_router(runs_list.router)
# Before the run page: routes match in order, and /runs/{run_id} would take /runs/new.
pages_router.include_router(new_run.router)
pages_router.include_router(run_page.router)
pages_router.include_router(run_actions.router)
# Before the template page, for the same reason: /templates/{name} would take /templates/_new.
pages_router.include_router(template_forms.router)
pages_router.include_router(template_pages.router)
