"""The runs resource under /api/v1/runs."""

from fastapi import APIRouter

router = APIRouter(prefix="/runs", tags=["runs"])
