"""Template versions in the database (SQLite and PostgreSQL): writers that race never get a 500."""

from __future__ import annotations

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session

from app.templates import store as template_store
from app.templates.registry import TemplateSpec
from app.templates.store import TemplateExists, TemplateVersionTaken, create_template, get_template, update_template

GRAPH = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
         "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "t"}}}


def spec(name: str = "Raced") -> TemplateSpec:
    return TemplateSpec(template_id="raced", name=name, description="", workflow_json=GRAPH,
                        input_schema={}, default_params={})


def test_an_update_that_lost_the_race_for_its_version_is_a_conflict(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Session(engine) as first, Session(engine) as second:
        created = create_template(first, spec())
        update_template(first, created, {"name": "first"})
        # The second writer read the highest version before the first one wrote: both aim at version 2.
        monkeypatch.setattr(template_store, "_next_version", lambda session, template_id: 2)
        with pytest.raises(TemplateVersionTaken):
            update_template(second, get_template(second, "raced", version=1), {"name": "second"})
        assert get_template(second, "raced").name == "first"  # the session is usable after the rollback


def test_a_registration_that_lost_the_race_is_template_exists(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    with Session(engine) as first, Session(engine) as second:
        create_template(first, spec())
        # The second writer looked before the first one wrote: no template yet, so version 1 for both.
        monkeypatch.setattr(template_store, "get_template", lambda session, template_id, version=None: None)
        monkeypatch.setattr(template_store, "_next_version", lambda session, template_id: 1)
        with pytest.raises(TemplateExists):
            create_template(second, spec("also raced"))


def test_a_process_that_lost_the_race_to_register_the_bundled_templates_starts_all_the_same(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The API and the worker start together and both register the bundled templates: the one that loses the race
    for a template finds it registered, and starts (it used to die of TemplateExists)."""
    with Session(engine) as first, Session(engine) as second:
        assert "solid_color" in template_store.load_bundled_templates(first)
        # The second process looked before the first one wrote: no template yet, so version 1 for both.
        monkeypatch.setattr(template_store, "get_template", lambda session, template_id, version=None: None)
        monkeypatch.setattr(template_store, "_next_version", lambda session, template_id: 1)
        assert template_store.load_bundled_templates(second) == []
