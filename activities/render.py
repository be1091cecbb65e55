"""The activity that turns a job's template (by id and version) or inline graph into a ComfyUI prompt.

The job's inputs and the rendered graph were checked when the job was accepted (app.submission), and a job
normally carries the prompt the API rendered then (GenerationInput.rendered), which the workflow runs as it
is. This renders the prompt for the rest: jobs started before the API passed it, and jobs too large to carry
it within the job size limit. Rendering again gives the same prompt, from the template version the job named.
"""

from __future__ import annotations

from sqlalchemy.engine import Engine
from temporalio import activity
from temporalio.exceptions import ApplicationError

from app.db import session_scope
from app.errors import ErrorCode, InvalidInput
from app.images.load_image import find_load_image_sources
from app.models import RenderPromptInput, RenderPromptResult
from app.templates.rendering import render_prompt
from app.templates.store import get_template


class RenderActivities:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @activity.defn(name="render_prompt")
    def render_prompt(self, request: RenderPromptInput) -> RenderPromptResult:
        graph = request.workflow_json or {}
        if request.template_id is not None:
            with session_scope(self._engine) as session:
                template = get_template(session, request.template_id, request.template_version)
            if template is None:
                raise ApplicationError(
                    f"workflow template {request.template_id} v{request.template_version} no longer exists",
                    type=ErrorCode.WORKFLOW_NOT_FOUND.value,
                    non_retryable=True,
                )
            graph = template.workflow_json
        try:
            prompt = render_prompt(graph, request.inputs)
        except InvalidInput as error:
            raise ApplicationError(
                str(error),
                {"fields": [{"field": issue.field, "message": issue.message} for issue in error.issues]},
                type=ErrorCode.VALIDATION_ERROR.value,
                non_retryable=True,
            ) from error
        # LoadImage inputs that are URLs or stored inline images still have to reach ComfyUI's input folder.
        return RenderPromptResult(prompt=prompt, image_sources=find_load_image_sources(prompt))
