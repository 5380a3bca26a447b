"""`GET /v1/status`: the last minute of the server as JSON, for the page's live view (server/static/).

One point per second (`StatusHistory` in server/metrics.py): sessions running and waiting, tokens per
second, the landing ratio (plans applied on time or late over plans resolved) and the mean planner lag
in positions (snapshot to resolution); the same rates over the whole window; the gauges now.
"""
from __future__ import annotations

from fastapi import APIRouter, Request

from .runtime import runtime_of

router = APIRouter()


@router.get("/v1/status")
async def status(request: Request) -> dict:
    runtime = runtime_of(request)
    return {"model": runtime.model_name, "ready": runtime.engine is not None,
            **runtime.status.report(runtime.metrics.totals())}
