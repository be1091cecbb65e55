"""The custom search attributes by which operators find jobs in the Temporal Web UI and CLI, e.g.
`JobStatus="failed" AND TemplateId="sdxl_realism_v1"` or `Owner="key-1a2b3c4d"`.

Keys only, no I/O: the workflow imports this module. `app.temporal_client` registers them.
"""

from __future__ import annotations

from temporalio.common import SearchAttributeKey

# The job's own status: a job cancelled by signal ends as a Completed workflow, so Temporal's
# ExecutionStatus alone cannot tell it from a success.
JOB_STATUS = SearchAttributeKey.for_keyword("JobStatus")
# The template a job runs; absent for jobs that send a raw workflowJson graph.
TEMPLATE_ID = SearchAttributeKey.for_keyword("TemplateId")

# The principal that created the job (its id, never a key); absent for jobs from before authentication.
OWNER = SearchAttributeKey.for_keyword("Owner")

JOB_SEARCH_ATTRIBUTES = (JOB_STATUS, TEMPLATE_ID, OWNER)
