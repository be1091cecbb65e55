"""The activity that turns a job's template (by id and version) or inline graph into a ComfyUI prompt."""

from __future__ import annotations

from sqlalchemy.engine import Engine
from temporalio import activity
from temporalio.exceptions import ApplicationError

from app.db import session_scope
from app.image_inputs import find_load_image_sources
from app.models import ErrorCode, RenderPromptInput, RenderPromptResult
from app.template_store import get_template
from app.templates import PromptError, check_limits, render_prompt


class RenderActivities:
    def __init__(self, engine: Engine, *, max_image_size: int, max_batch_size: int) -> None:
        self._engine = engine
        self._max_image_size = max_image_size
        self._max_batch_size = max_batch_size

    @activity.defn(name="render_prompt")
    def render_prompt(self, request: RenderPromptInput) -> RenderPromptResult:
        if request.template_id is not None:
            with session_scope(self._engine) as session:
                template = get_template(session, request.template_id, request.template_version)
            if template is None:
                raise ApplicationError(
                    f"workflow template {request.template_id} v{request.template_version} no longer exists",
                    type=ErrorCode.WORKFLOW_NOT_FOUND.value,
                    non_retryable=True,
                )
            # The inputs were checked against this version's schema and completed when the job was accepted.
            graph, values, limit_nodes = template.workflow_json, request.inputs, False
        else:
            graph, values, limit_nodes = request.workflow_json or {}, request.inputs, True
        try:
            prompt = render_prompt(graph, values)
            if limit_nodes:
                check_limits(prompt, max_image_size=self._max_image_size, max_batch_size=self._max_batch_size)
        except PromptError as error:
            raise ApplicationError(
                str(error),
                {"fields": [{"field": issue.field, "message": issue.message} for issue in error.issues]},
                type=ErrorCode.VALIDATION_ERROR.value,
                non_retryable=True,
            ) from error
        # LoadImage inputs that are URLs or stored inline images still have to reach ComfyUI's input folder.
        return RenderPromptResult(prompt=prompt, image_sources=find_load_image_sources(prompt))
