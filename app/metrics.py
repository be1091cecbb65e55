"""The gateway's Prometheus metrics (prometheus-client, in the process's default registry)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

# Lookups of cacheable jobs with CACHE_ENABLED; a job that is not cacheable looks nothing up.
CACHE_LOOKUPS = Counter(
    "gateway_result_cache_lookups", "result cache lookups by POST /jobs, by result (hit or miss)", ["result"]
)
CACHE_HITS = CACHE_LOOKUPS.labels(result="hit")
CACHE_MISSES = CACHE_LOOKUPS.labels(result="miss")

# Requests refused for their credentials, by what was wrong: the answer never says, the operator may see it.
AUTH_FAILURES = Counter("gateway_auth_failures", "requests refused with 401 AUTH_FAILED", ["reason"])

# Requests waiting for a job's end (`wait=`), and the Temporal long polls they share: one per job waited on.
JOB_WAITS = Gauge("gateway_job_waits", "requests waiting (wait=) for a job to end")
JOB_WAIT_POLLS = Counter("gateway_job_wait_polls", "Temporal long polls for a job's end, each shared by the requests "
                                                   "waiting on that job")
JOB_WAIT_POLLS_OPEN = Gauge("gateway_job_wait_polls_open", "Temporal long polls for a job's end open now")
