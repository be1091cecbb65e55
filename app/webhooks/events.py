"""The events a job's webhook may carry; a job without `webhookEvents` gets the terminal ones."""

TERMINAL_EVENTS = ("job.succeeded", "job.failed", "job.cancelled")
PROGRESS_EVENT = "job.progress"
EVENTS = (*TERMINAL_EVENTS, PROGRESS_EVENT)
