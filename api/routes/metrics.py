"""GET /metrics: this API process's Prometheus metrics (api.metrics_collectors), in the text format or, when
the scraper asks for it, OpenMetrics. Not in the OpenAPI document: it is Prometheus's, not a JSON resource."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client.exposition import choose_encoder

from api.deps import require_metrics_token

router = APIRouter(tags=["metrics"])


@router.get("/metrics", include_in_schema=False, dependencies=[Depends(require_metrics_token)])
def metrics(request: Request) -> Response:
    # A plain `def`: FastAPI runs it on a worker thread, where the scrape's one database read may block.
    encoder, content_type = choose_encoder(request.headers.get("accept"))
    return Response(encoder(request.app.state.metrics), media_type=content_type)
