"""HTTP routes: `api_router` is everything under /api/v1."""

from fastapi import APIRouter, Depends

from api.auth import authorize
from api.routes import artifacts, callbacks, champions, deliveries, runs, templates, tokens

# Every route under /api/v1 is checked by `authorize` (api/auth.py decides the scope by method
# and path, so a route added later is covered without anyone remembering to protect it).
api_router = APIRouter(prefix="/api/v1", dependencies=[Depends(authorize)])
api_router.include_router(runs.router)
api_router.include_router(callbacks.router)
api_router.include_router(artifacts.router)
api_router.include_router(templates.router)
api_router.include_router(champions.router)
api_router.include_router(deliveries.router)
api_router.include_router(tokens.router)
