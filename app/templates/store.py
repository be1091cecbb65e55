"""The template registry's storage: immutable (id, version) rows, and the bundled templates in templates/."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import func, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from sqlalchemy.engine import Engine

import templates
from app.db import require_current_schema, session_scope
from app.tables import TemplateRow
from app.templates.registry import TemplateSpec, check_template

# The top-level `templates` package's data, so that an installed gateway, not only a checkout, has them.
BUNDLED_TEMPLATES_DIR = Path(templates.__file__).resolve().parent


class TemplateExists(Exception):
    pass


class TemplateVersionTaken(Exception):
    """Another write created this version of the template first."""

    def __init__(self, template_id: str, version: int) -> None:
        super().__init__(f"version {version} of {template_id} was written by another request")
        self.template_id = template_id
        self.version = version


def get_template(session: Session, template_id: str, version: int | None = None) -> TemplateRow | None:
    """A given version (even of a deleted template: a job submitted before the delete still runs), or the
    latest version of a template that is not deleted."""
    query = select(TemplateRow).where(TemplateRow.template_id == template_id)
    if version is not None:
        query = query.where(TemplateRow.version == version)
    else:
        query = query.where(col(TemplateRow.deleted_at).is_(None))
    return session.exec(query.order_by(col(TemplateRow.version).desc()).limit(1)).first()


def list_latest_templates(session: Session) -> list[TemplateRow]:
    latest = (
        select(TemplateRow.template_id, func.max(TemplateRow.version).label("version"))
        .where(col(TemplateRow.deleted_at).is_(None))
        .group_by(TemplateRow.template_id)
        .subquery()
    )
    query = select(TemplateRow).join(
        latest, (TemplateRow.template_id == latest.c.template_id) & (TemplateRow.version == latest.c.version)
    )
    return list(session.exec(query.order_by(TemplateRow.template_id)).all())


def _next_version(session: Session, template_id: str) -> int:
    highest = session.exec(select(func.max(TemplateRow.version)).where(TemplateRow.template_id == template_id)).one()
    return (highest or 0) + 1


def _insert(session: Session, spec: TemplateSpec, version: int) -> TemplateRow:
    row = TemplateRow(
        template_id=spec.template_id,
        version=version,
        name=spec.name,
        description=spec.description,
        workflow_json=spec.workflow_json,
        input_schema=spec.input_schema,
        default_params=spec.default_params,
        limits=spec.limits,
        backend_tag=spec.backend_tag,
        created_at=datetime.now(timezone.utc),
    )
    session.add(row)
    try:
        session.commit()
    except IntegrityError as error:
        # Two writers computed the same next version at once; the version that landed first stands.
        session.rollback()
        raise TemplateVersionTaken(spec.template_id, version) from error
    return row


def create_template(session: Session, spec: TemplateSpec) -> TemplateRow:
    """Version 1 of a new template (or the next version of a deleted one, whose old versions stay)."""
    check_template(spec)
    if get_template(session, spec.template_id) is not None:
        raise TemplateExists(spec.template_id)
    try:
        return _insert(session, spec, _next_version(session, spec.template_id))
    except TemplateVersionTaken as error:
        raise TemplateExists(spec.template_id) from error  # registered by someone else a moment ago


def updated_spec(current: TemplateRow, changes: dict[str, Any]) -> TemplateSpec:
    """The template as it would be with `changes` (snake_case fields) applied."""
    return TemplateSpec(
        template_id=current.template_id,
        name=changes.get("name", current.name),
        description=changes.get("description", current.description),
        workflow_json=changes.get("workflow_json", current.workflow_json),
        input_schema=changes.get("input_schema", current.input_schema),
        default_params=changes.get("default_params", current.default_params),
        limits=changes.get("limits", current.limits),
        # "" takes the tag away.
        backend_tag=changes.get("backend_tag", current.backend_tag) or None,
    )


def update_template(session: Session, current: TemplateRow, changes: dict[str, Any]) -> TemplateRow:
    """A new version with `changes` applied; the old version is kept for the jobs that named it. Changes that
    change nothing write no version: the current one is returned."""
    spec = updated_spec(current, changes)
    check_template(spec)
    if _as_json(spec) == _as_json(updated_spec(current, {})):
        return current
    return _insert(session, spec, _next_version(session, current.template_id))


def _as_json(spec: TemplateSpec) -> str:
    # Compared as JSON text, not as Python values, where 1 == 1.0 == true would hide a change of type.
    return json.dumps(asdict(spec), sort_keys=True)


def delete_template(session: Session, template_id: str) -> bool:
    result = session.execute(
        update(TemplateRow)
        .where(TemplateRow.template_id == template_id, col(TemplateRow.deleted_at).is_(None))
        .values(deleted_at=datetime.now(timezone.utc))
    )
    session.commit()
    return result.rowcount > 0


def read_template_file(path: Path) -> TemplateSpec:
    spec = json.loads(path.read_text())
    return TemplateSpec(
        template_id=spec["id"],
        name=spec["name"],
        description=spec.get("description", ""),
        workflow_json=spec["workflowJson"],
        input_schema=spec.get("inputSchema", {}),
        default_params=spec.get("defaultParams", {}),
        limits=spec.get("limits", {}),
        backend_tag=spec.get("backendTag"),
    )


def load_bundled_templates(session: Session, directory: Path = BUNDLED_TEMPLATES_DIR) -> list[str]:
    """Register each bundled template the registry has never had; returns the ids added. A template an
    admin deleted stays deleted."""
    added = []
    for path in sorted(directory.glob("*.json")):
        spec = read_template_file(path)
        if get_template(session, spec.template_id, version=1) is None:
            try:
                create_template(session, spec)
            except TemplateExists:
                continue  # another process starting beside this one (the API, a worker) registered it first
            added.append(spec.template_id)
    return added


def prepare_database(engine: Engine) -> None:
    """The schema at this code's head revision (else SchemaNotCurrent: the API, the worker and the registry
    commands never migrate it themselves) and the bundled templates registered: what every entry point of the
    gateway expects."""
    require_current_schema(engine)
    with session_scope(engine) as session:
        load_bundled_templates(session)
