"""The worker compiles the workflow modules once, so that the sandbox's import of them for each workflow
instance reads bytecode instead of compiling the source again."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

import pytest

import workflows_temporal.generation
from worker.bytecode import cache_workflow_bytecode


def test_the_workflow_modules_are_imported_from_cached_bytecode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "pycache_prefix", str(tmp_path))  # the cache goes here, not into the checkout
    source = workflows_temporal.generation.__file__
    assert not Path(importlib.util.cache_from_source(source)).exists()

    cache_workflow_bytecode()

    assert Path(importlib.util.cache_from_source(source)).is_file()

    def compile_again(*_: object) -> None:
        raise AssertionError("the workflow module's source was compiled again")

    monkeypatch.setattr(importlib.machinery.SourceFileLoader, "source_to_code", compile_again)
    loader = importlib.machinery.SourceFileLoader("workflows_temporal.generation", source)
    assert loader.get_code("workflows_temporal.generation") is not None
