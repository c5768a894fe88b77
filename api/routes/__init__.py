"""HTTP routes: `api_router` is everything under /api/v1."""

from fastapi import APIRouter

from api.routes import runs

api_router = APIRouter(prefix="/api/v1")
api_router.include_router(runs.router)
