"""The custom search attributes by which operators find jobs in the Temporal Web UI and CLI, e.g.
`JobStatus="failed" AND TemplateId="sdxl_realism_v1"`, `Owner="key-1a2b3c4d"`, `Backend="gpu-2"`,
`Priority <= 2` or `BatchId="..."`.

Keys only, no I/O: the workflow imports this module. `app.temporal_client` registers them.
"""

from __future__ import annotations

from temporalio.common import SearchAttributeKey

# The job's own status: Temporal's ExecutionStatus says how the workflow ended, not what the job did (a job that
# failed on ComfyUI ends its workflow as Failed, one cancelled as Canceled, but a job of an older release that was
# cancelled by signal ends as Completed).
JOB_STATUS = SearchAttributeKey.for_keyword("JobStatus")
# The template a job runs; absent for jobs that send a raw workflowJson graph.
TEMPLATE_ID = SearchAttributeKey.for_keyword("TemplateId")

# The principal that created the job (its id, never a key); absent for jobs from before authentication.
OWNER = SearchAttributeKey.for_keyword("Owner")

# The ComfyUI backend (a COMFYUI_URLS name) the job's prompt is placed on; absent while it waits for a slot, and
# again while a new attempt waits for one.
BACKEND = SearchAttributeKey.for_keyword("Backend")
# The job's priority, 1 highest … 5 lowest: an Int, so that `Priority <= 2` finds the urgent ones.
PRIORITY = SearchAttributeKey.for_int("Priority")
# The batch the job is an item of; absent for a job of its own.
BATCH_ID = SearchAttributeKey.for_keyword("BatchId")

JOB_SEARCH_ATTRIBUTES = (JOB_STATUS, TEMPLATE_ID, OWNER, BACKEND, PRIORITY, BATCH_ID)
