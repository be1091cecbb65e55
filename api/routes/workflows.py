"""The workflow template registry: list, register, read, update (a new version), delete.

Every caller may read templates; registering, updating and deleting them is an admin's, and audited.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from pydantic import ConfigDict, Field, WithJsonSchema, field_validator
from pydantic.json_schema import SkipJsonSchema

from api.deps import AdminDep, DatabaseDep, SessionDep
from api.errors import ApiError, invalid_input
from api.json_body import JsonBodyRoute
from api.openapi import answers_with
from api.rate_limits import limit_principal
from app.audit import TEMPLATE_CREATE, TEMPLATE_DELETE, TEMPLATE_UPDATE, record_audit
from app.comfy.client import ComfyClient
from app.db import as_utc
from app.errors import ErrorCode, InvalidInput
from app.models import CamelModel
from app.tables import TemplateRow
from app.templates.limits import TemplateLimits
from app.templates.registry import TEMPLATE_ID, TemplateSpec, check_node_types, check_template
from app.templates.rendering import ApiFormatGraph
from app.templates.schema import parse_schema, to_json_schema
from app.templates.store import TemplateExists, create_template, delete_template, get_template, list_latest_templates
from app.templates.store import TemplateVersionTaken, update_template, updated_spec

router = APIRouter(
    prefix="/workflows", tags=["workflows"], route_class=JsonBodyRoute, dependencies=[Depends(limit_principal)])

# A template's `limits`, documented as check_template reads them; the body keeps the raw object, which is stored.
LimitsJson = Annotated[dict[str, Any], WithJsonSchema(TemplateLimits.model_json_schema(by_alias=True))]


class WorkflowSummary(CamelModel):
    id: str
    name: str
    description: str
    version: int


class Workflow(WorkflowSummary):
    workflow_json: dict[str, Any]
    input_schema: dict[str, Any]
    json_schema: dict[str, Any] = Field(description="the inputs as standard JSON Schema")
    default_params: dict[str, Any]
    limits: dict[str, Any] = Field(description="the template's own maxImageSize/maxBatchSize, if any")
    backend_tag: str | None = Field(None, description="its jobs run only on a backend with this tag")
    created_at: datetime


class WorkflowList(CamelModel):
    workflows: list[WorkflowSummary]


class WorkflowResponse(CamelModel):
    workflow: Workflow
    warnings: list[str] = Field(default_factory=list)


class CreateWorkflowRequest(CamelModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "id": "plain_square",
        "name": "Plain square",
        "workflowJson": {
            "1": {"class_type": "EmptyImage",
                  "inputs": {"width": "{{size}}", "height": "{{size}}", "batch_size": 1, "color": 0}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "square"}},
        },
        "inputSchema": {"type": "object", "fields": {"size": {"type": "integer", "min": 8, "max": 1024, "default": 64}}},
    }]})

    # check_template's rule, documented; checked there, with its own message.
    id: str = Field(json_schema_extra={"pattern": f"^{TEMPLATE_ID.pattern}$"})
    name: str = Field(min_length=1, max_length=200)
    description: str = Field("", max_length=2000)
    workflow_json: ApiFormatGraph
    input_schema: dict[str, Any] = Field(default_factory=dict)
    default_params: dict[str, Any] = Field(default_factory=dict)
    limits: LimitsJson = Field(
        default_factory=dict, description='{"maxImageSize": N, "maxBatchSize": M}: in place of the operator\'s limits')
    backend_tag: str | None = Field(
        None, max_length=32, description="its jobs run only on a backend with this tag (COMFYUI_URLS), unless a "
                                         "job gives its own backendTag")


class UpdateWorkflowRequest(CamelModel):
    model_config = ConfigDict(extra="forbid")

    # None is "left out" (an explicit null is refused, below), so the document shows no null.
    name: str | SkipJsonSchema[None] = Field(None, min_length=1, max_length=200)
    description: str | SkipJsonSchema[None] = Field(None, max_length=2000)
    workflow_json: ApiFormatGraph | SkipJsonSchema[None] = None
    input_schema: dict[str, Any] | SkipJsonSchema[None] = None
    default_params: dict[str, Any] | SkipJsonSchema[None] = None
    limits: LimitsJson | SkipJsonSchema[None] = None
    backend_tag: str | SkipJsonSchema[None] = Field(None, max_length=32, description='"" takes the tag away')

    @field_validator("*", mode="before")
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        # None stands for "left out, keep the current value"; an explicit null is not a value to store.
        if value is None:
            raise ValueError("null is not a value; leave the field out to keep the current one")
        return value


def _workflow(row: TemplateRow) -> Workflow:
    return Workflow(
        id=row.template_id,
        name=row.name,
        description=row.description,
        version=row.version,
        workflow_json=row.workflow_json,
        input_schema=row.input_schema,
        json_schema=to_json_schema(parse_schema(row.input_schema), row.default_params),
        default_params=row.default_params,
        limits=row.limits,
        backend_tag=row.backend_tag,
        created_at=as_utc(row.created_at),
    )


def _not_found(template_id: str) -> ApiError:
    return ApiError(ErrorCode.WORKFLOW_NOT_FOUND, f"no workflow template with id {template_id}",
                    {"workflowId": template_id})


async def _checked_against_comfyui(request: Request, spec: TemplateSpec) -> list[str]:
    """Warnings about node types; a link to an output the node does not have is a 400 before anything is saved."""
    client = ComfyClient(request.app.state.probes.answering_backend().url, request.app.state.http)
    report = await check_node_types(
        spec.workflow_json, lambda: request.app.state.comfyui_answers.get("object_info", client.object_info)
    )
    if report.issues:
        raise invalid_input(InvalidInput(report.issues))
    return report.warnings


@router.get("", response_model=WorkflowList)
def list_workflows(session: SessionDep) -> WorkflowList:
    return WorkflowList(workflows=[
        WorkflowSummary(id=row.template_id, name=row.name, description=row.description, version=row.version)
        for row in list_latest_templates(session)
    ])


@router.post("", status_code=201, response_model=WorkflowResponse)
@answers_with(ErrorCode.WORKFLOW_EXISTS)
async def register_workflow(
    body: CreateWorkflowRequest, request: Request, db: DatabaseDep, admin: AdminDep
) -> WorkflowResponse:
    spec = TemplateSpec(template_id=body.id, name=body.name, description=body.description,
                        workflow_json=body.workflow_json, input_schema=body.input_schema,
                        default_params=body.default_params, limits=body.limits,
                        backend_tag=body.backend_tag)
    try:
        check_template(spec)
        warnings = await _checked_against_comfyui(request, spec)
        row = await db.run(create_template, spec)
    except InvalidInput as error:
        raise invalid_input(error) from error
    except TemplateExists as error:
        raise ApiError(ErrorCode.WORKFLOW_EXISTS, f"a workflow template with id {body.id} exists",
                       {"workflowId": body.id}) from error
    await db.run(record_audit, admin, TEMPLATE_CREATE, row.template_id, {"version": row.version})
    return WorkflowResponse(workflow=_workflow(row), warnings=warnings)


@router.get("/{template_id}", response_model=WorkflowResponse)
@answers_with(ErrorCode.WORKFLOW_NOT_FOUND)
def read_workflow(template_id: str, session: SessionDep) -> WorkflowResponse:
    row = get_template(session, template_id)
    if row is None:
        raise _not_found(template_id)
    return WorkflowResponse(workflow=_workflow(row))


@router.put("/{template_id}", response_model=WorkflowResponse)
@answers_with(ErrorCode.WORKFLOW_NOT_FOUND, ErrorCode.WORKFLOW_CONFLICT)
async def change_workflow(
    template_id: str, body: UpdateWorkflowRequest, request: Request, db: DatabaseDep,
    admin: AdminDep,
) -> WorkflowResponse:
    """A partial update: the fields given replace the current ones in a new version, checked as a registration
    is. A body that changes nothing (`{}`, or the current values) writes no version: the answer is the
    current one."""
    current = await db.run(get_template, template_id)
    if current is None:
        raise _not_found(template_id)
    changes = body.model_dump(exclude_unset=True, by_alias=False)
    spec = updated_spec(current, changes)
    try:
        check_template(spec)
        warnings = await _checked_against_comfyui(request, spec) if "workflow_json" in changes else []
        row = await db.run(update_template, current, changes)
    except InvalidInput as error:
        raise invalid_input(error) from error
    except TemplateVersionTaken as error:
        raise ApiError(ErrorCode.WORKFLOW_CONFLICT,
                       f"another update of {template_id} landed at the same moment; read it and try again",
                       {"workflowId": template_id, "version": error.version}) from error
    if row.version != current.version:  # a body that changed nothing wrote no version, and did nothing
        await db.run(record_audit, admin, TEMPLATE_UPDATE, template_id,
                     {"version": row.version, "fields": sorted(changes)})
    return WorkflowResponse(workflow=_workflow(row), warnings=warnings)


@router.delete("/{template_id}", status_code=204, response_class=Response)
@answers_with(ErrorCode.WORKFLOW_NOT_FOUND)
def remove_workflow(template_id: str, session: SessionDep, admin: AdminDep) -> Response:
    if not delete_template(session, template_id):
        raise _not_found(template_id)
    record_audit(session, admin, TEMPLATE_DELETE, template_id)
    return Response(status_code=204)
