"""Liveness and readiness probes."""

from fastapi import APIRouter

router = APIRouter(tags=["health"])
