"""Ending a process that ran the Temporal SDK without the interpreter's teardown (app.interpreter_exit): what
it wrote still arrives, and its exit code is the one the command asked for. The crash it avoids happens in some
runs only (bench-like loops measure it; README "Troubleshooting"); these check that nothing is lost on the way."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.harness import REPO_ROOT

# A process with the SDK's core running (a Runtime: its threads), whose command writes to a pipe, buffered,
# through print and logging, then ends as the command given on the command line says.
_PROGRAM = """
import logging, sys
from temporalio.runtime import Runtime, TelemetryConfig
from app.interpreter_exit import run_then_exit

Runtime(telemetry=TelemetryConfig())
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")

def command():
    print("the answer", end="")
    logging.getLogger("test").info("a log line")
    ending = sys.argv[1]
    if ending == "return":
        return
    if ending == "interrupt":
        raise KeyboardInterrupt
    if ending == "fault":
        raise ValueError("boom")
    sys.exit(int(ending) if ending.isdigit() else ending)

run_then_exit(command)
print("never printed")
"""


@pytest.mark.parametrize(("ending", "code", "error"), [
    ("return", 0, ""),
    ("78", 78, ""),
    ("comfyui-gateway api: a reason", 1, "comfyui-gateway api: a reason\n"),
    ("interrupt", 130, ""),
    ("fault", 1, "ValueError: boom"),
])
def test_the_process_ends_with_the_commands_code_and_everything_it_wrote(ending: str, code: int, error: str) -> None:
    done = subprocess.run([sys.executable, "-c", _PROGRAM, ending], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert done.returncode == code, done.stderr
    assert done.stdout == "the answer"  # buffered in the pipe, flushed before os._exit
    assert done.stderr.startswith("a log line\n") and error in done.stderr
