"""Where the API serves a job's output: `GET /outputs/{jobId}/{filename}`, which streams the file or redirects
to a fresh URL of the store's. The public job and the webhook bodies both name outputs by it."""

from __future__ import annotations

from urllib.parse import quote


def output_route(job_id: str, filename: str) -> str:
    return f"/outputs/{job_id}/{quote(filename, safe='')}"
