"""The command line's commands for people: run a job and watch it, look at jobs, manage workflow templates,
all through a running gateway's API (`--url` / GATEWAY_URL, `--api-key` / GATEWAY_API_KEY), with the Python
client (comfyui_gateway_client). Nothing here reads the database or the gateway's settings.

Exit codes: 0 done; 1 the gateway refused the request (its error code is printed); 2 bad usage; 3 the gateway
is unreachable; 4 authentication failed or the role may not do this; 5 the job failed or was cancelled;
130 interrupted (a job being followed keeps running).
"""

from __future__ import annotations

import argparse
import base64
import json
import mimetypes
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from comfyui_gateway_client import (
    AuthFailed,
    Forbidden,
    GatewayClient,
    GatewayError,
    GatewayUnreachable,
    InvalidGatewayUrl,
    Job,
    JobFailed,
)
from comfyui_gateway_client.config import DEFAULT_URL

EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_AUTH, EXIT_JOB_FAILED, EXIT_INTERRUPTED = 1, 2, 3, 4, 5, 130
EXIT_CODES_HELP = """exit codes of generate, jobs and workflows:
  0 done, 1 the gateway refused the request (its error code is printed), 2 bad usage,
  3 the gateway is unreachable, 4 authentication failed or the role may not do this,
  5 the job failed or was cancelled, 130 interrupted (a job being followed keeps running)"""


class UsageError(Exception):
    """A problem with what the user typed or named (an --input, a file), found before calling the gateway."""


def add_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help=f"the gateway's API (default: GATEWAY_URL, else {DEFAULT_URL})")
    common.add_argument("--api-key", help="an API key (default: GATEWAY_API_KEY)")
    common.add_argument("--token", help="a JWT, sent as a bearer token (default: GATEWAY_TOKEN)")
    common.add_argument("--json", action="store_true", help="print JSON for scripts instead of text")

    generate = commands.add_parser("generate", parents=[common], help="run a workflow template, watch it, download its outputs")
    generate.add_argument("template", help="the template's id (`comfyui-gateway workflows list`)")
    generate.add_argument("--input", "-i", action="append", default=[], metavar="KEY=VALUE",
                          help="an input: VALUE is read as JSON when it is JSON (64, true, [1,2]), else as text; "
                               "KEY=@FILE sends a file's bytes (an image input) inline")
    generate.add_argument("--out", "-o", type=Path, default=Path("."), help="where the outputs go (default: here)")
    generate.add_argument("--priority", help="high, normal, low, or 1 (highest) to 5")
    generate.add_argument("--output-format", choices=["png", "jpg", "webp"], help="what still images are stored as")
    generate.set_defaults(run=_generate)

    jobs = commands.add_parser("jobs", help="list, show, cancel, read the log of, or download jobs")
    job_commands = jobs.add_subparsers(dest="action", required=True)
    listing = job_commands.add_parser("list", parents=[common], help="recent jobs, newest first")
    listing.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    listing.add_argument("--workflow", help="only this template's jobs")
    listing.add_argument("--limit", type=int, default=20)
    listing.set_defaults(run=_jobs_list)
    for name, run, text in (("show", _jobs_show, "one job"), ("logs", _jobs_logs, "a job's event log")):
        command = job_commands.add_parser(name, parents=[common], help=text)
        command.add_argument("job_id")
        command.set_defaults(run=run)
    cancel = job_commands.add_parser("cancel", parents=[common], help="cancel a job")
    cancel.add_argument("job_id")
    cancel.add_argument("--reason", default="cancelled from the command line")
    cancel.set_defaults(run=_jobs_cancel)
    download = job_commands.add_parser("download", parents=[common], help="download a finished job's outputs")
    download.add_argument("job_id")
    download.add_argument("--out", "-o", type=Path, default=Path("."))
    download.set_defaults(run=_jobs_download)

    workflows = commands.add_parser("workflows", help="list, show, add, update or delete workflow templates")
    workflow_commands = workflows.add_subparsers(dest="action", required=True)
    workflow_commands.add_parser("list", parents=[common], help="the registered templates").set_defaults(
        run=_workflows_list)
    show = workflow_commands.add_parser("show", parents=[common], help="one template: its inputs, or with --json all")
    show.add_argument("template")
    show.set_defaults(run=_workflows_show)
    add = workflow_commands.add_parser("add", parents=[common], help="register a graph as a template (admin)")
    add.add_argument("file", type=Path, help="the graph, saved in ComfyUI with \"Export (API)\"; or a whole "
                                             "template (a JSON object with id, workflowJson, inputSchema, ...)")
    add.add_argument("--id", dest="template", help="the template's id (a whole template file has its own)")
    update = workflow_commands.add_parser("update", parents=[common], help="change a template: a new version (admin)")
    update.add_argument("template")
    update.add_argument("file", type=Path, nargs="?", help="a new graph (\"Export (API)\")")
    for command in (add, update):
        command.add_argument("--name")
        command.add_argument("--description")
        command.add_argument("--schema", type=Path, help='the input schema: {"type": "object", "fields": {...}}')
        command.add_argument("--defaults", type=Path, help="default values for placeholders")
        command.add_argument("--limits", type=Path, help='{"maxImageSize": N, "maxBatchSize": M}')
        command.add_argument("--backend-tag", help="run its jobs only on backends with this tag")
    add.set_defaults(run=_workflows_add)
    update.set_defaults(run=_workflows_update)
    delete = workflow_commands.add_parser("delete", parents=[common], help="delete a template (admin)")
    delete.add_argument("template")
    delete.set_defaults(run=_workflows_delete)


def run(args: argparse.Namespace) -> None:
    """Run a user command; every failure becomes a message on stderr (JSON on stdout with --json) and an exit code."""
    try:
        with GatewayClient(args.url, api_key=args.api_key, token=args.token) as gateway:
            args.run(gateway, args)
    except UsageError as error:
        _fail(args, EXIT_USAGE, "USAGE", str(error))
    except InvalidGatewayUrl as error:
        _fail(args, EXIT_USAGE, "USAGE", f"{error} (--url or GATEWAY_URL)")
    except GatewayUnreachable as error:
        _fail(args, EXIT_UNREACHABLE, error.code, f"{error.message} (is it running? `comfyui-gateway dev` starts "
              "one; --url or GATEWAY_URL names another)", error.details)
    except (AuthFailed, Forbidden) as error:
        hint = (" (give a key with --api-key or GATEWAY_API_KEY, or a token with --token)"
                if isinstance(error, AuthFailed) else "")
        _fail(args, EXIT_AUTH, error.code, error.message + hint, error.details)
    except JobFailed as error:
        _fail(args, EXIT_JOB_FAILED, error.code, f"job {error.job.job_id} {error.job.status.value}: {error.message}",
              error.details)
    except GatewayError as error:
        _fail(args, EXIT_REFUSED, error.code, error.message, error.details)
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)


def _fail(args: argparse.Namespace, exit_code: int, code: str, message: str, details: dict[str, Any] | None = None
          ) -> None:
    details = details or {}
    if args.json:
        print(json.dumps({"error": {"code": code, "message": message, "details": details}}))
    else:
        lines = [f"comfyui-gateway: {code}: {message}"]
        fields = [f"{field['field']}: {field['message']}" for field in details.get("fields", [])]
        lines += [f"  {field}" for field in fields if field not in message]  # the message names the first
        print("\n".join(lines), file=sys.stderr)
    sys.exit(exit_code)


def _print_json(value: Any) -> None:
    plain = value.model_dump(mode="json", by_alias=True) if isinstance(value, BaseModel) else value
    print(json.dumps(plain, indent=2))


def _print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """Aligned columns, one row a line, never wrapped: what people read and what `grep` and `awk` take."""
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header) - 1)]
    for row in [header, *rows]:
        print("  ".join([cell.ljust(width) for cell, width in zip(row, widths)] + [row[-1]]))


# --- generate ---------------------------------------------------------------------------------------------


def parse_inputs(pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs: a value that is JSON is that JSON value, else the text itself; `key=@path` is the
    file's bytes as a data URI (how the API takes an inline image)."""
    inputs: dict[str, Any] = {}
    for pair in pairs:
        key, equals, value = pair.partition("=")
        if not equals or not key:
            raise UsageError(f"--input {pair!r}: write KEY=VALUE")
        if value.startswith("@"):
            inputs[key] = _data_uri(Path(value[1:]))
            continue
        try:
            inputs[key] = json.loads(value)
        except ValueError:
            inputs[key] = value
    return inputs


def _data_uri(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror}") from error
    kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


def _generate(gateway: GatewayClient, args: argparse.Namespace) -> None:
    priority = int(args.priority) if args.priority and args.priority.isdigit() else args.priority  # 1-5 or a name
    options = {name: value for name, value in (("priority", priority), ("output_format", args.output_format))
               if value is not None}
    submitted = gateway.submit(args.template, parse_inputs(args.input), **options)
    try:
        with _progress_bar(args.json, submitted.job_id) as show:
            job = gateway.wait(submitted.job_id, on_progress=show)
    except KeyboardInterrupt:
        print(f"\nstopped watching; job {submitted.job_id} goes on "
              f"(`comfyui-gateway jobs cancel {submitted.job_id}` cancels it)", file=sys.stderr)
        raise
    paths = gateway.download_outputs(job.job_id, args.out)
    if args.json:
        _print_json({"job": job.model_dump(mode="json", by_alias=True), "files": [str(path) for path in paths]})
        return
    took = (job.timing.completed_at - job.timing.created_at).total_seconds() if job.timing.completed_at else 0.0
    print(f"job {job.job_id} succeeded in {took:.1f} s" + (" (from the result cache)" if job.cache_hit else ""),
          file=sys.stderr)
    for path in paths:
        print(path)


@contextmanager
def _progress_bar(quiet: bool, job_id: str) -> Iterator[Callable[[Job], None]]:
    """A live bar on stderr (stdout keeps the paths): status, current node, percent; nothing with --json."""
    if quiet:
        yield lambda job: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True, highlight=False)) as progress:
        task = progress.add_task(f"job {job_id[:8]} submitted", total=100)

        def show(job: Job) -> None:
            if job.status.value == "queued":
                ahead = "" if job.queue_position is None else f", {job.queue_position} ahead"
                where = f"queued{ahead}"
            elif job.current_node:
                where = f"{job.status.value} node {job.current_node}"
            else:
                where = job.status.value
            progress.update(task, completed=job.progress, description=f"job {job.job_id[:8]} {where}")

        yield show


# --- jobs -------------------------------------------------------------------------------------------------


def _jobs_list(gateway: GatewayClient, args: argparse.Namespace) -> None:
    page = gateway.list_jobs(status=args.status, template=args.workflow, limit=args.limit)
    if args.json:
        _print_json(page)
        return
    _print_table(("job", "status", "workflow", "progress", "created"), [
        (job.job_id, job.status.value, job.workflow_id or "(graph)", f"{job.progress}%",
         job.timing.created_at.strftime("%Y-%m-%d %H:%M:%S")) for job in page.jobs])


def _jobs_show(gateway: GatewayClient, args: argparse.Namespace) -> None:
    job = gateway.get_job(args.job_id)
    if args.json:
        _print_json(job)
        return
    rows = [("job", job.job_id), ("status", job.status.value), ("workflow", job.workflow_id or "(graph)"),
            ("progress", f"{job.progress}%"), ("created", job.timing.created_at.isoformat())]
    if job.current_node:
        rows.append(("node", job.current_node))
    if job.queue_position is not None:
        rows.append(("ahead", str(job.queue_position)))
    if job.error:
        rows.append(("error", f"{job.error.code}: {job.error.message}"))
    rows += [("output", f"{file.filename} ({file.size} bytes, {file.content_type})") for file in job.outputs]
    for name, value in rows:
        print(f"{name:<9} {value}")


def _jobs_cancel(gateway: GatewayClient, args: argparse.Namespace) -> None:
    answer = gateway.cancel(args.job_id, args.reason)
    if args.json:
        _print_json(answer)
    else:
        print(f"job {answer.job_id} {answer.status.value}: {answer.message}")


def _jobs_logs(gateway: GatewayClient, args: argparse.Namespace) -> None:
    logs = gateway.logs(args.job_id)
    if args.json:
        _print_json(logs)
        return
    for entry in logs.events:
        print(f"{entry.at.isoformat(timespec='milliseconds')}  {entry.kind:<20} {entry.message}")


def _jobs_download(gateway: GatewayClient, args: argparse.Namespace) -> None:
    paths = gateway.download_outputs(args.job_id, args.out)
    if args.json:
        _print_json({"files": [str(path) for path in paths]})
        return
    for path in paths:
        print(path)


# --- workflows --------------------------------------------------------------------------------------------


def _read_json(path: Path | None, what: str) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        value = json.loads(path.read_text())
    except OSError as error:
        raise UsageError(f"cannot read {what} {path}: {error.strerror}") from error
    except ValueError as error:
        raise UsageError(f"{what} {path} is not JSON: {error}") from error
    if not isinstance(value, dict):
        raise UsageError(f"{what} {path} must hold a JSON object")
    return value


def _workflows_list(gateway: GatewayClient, args: argparse.Namespace) -> None:
    workflows = gateway.list_workflows()
    if args.json:
        _print_json({"workflows": [summary.model_dump(mode="json", by_alias=True) for summary in workflows]})
        return
    _print_table(("id", "version", "name"), [(summary.id, str(summary.version), summary.name) for summary in workflows])


def _workflows_show(gateway: GatewayClient, args: argparse.Namespace) -> None:
    workflow = gateway.get_workflow(args.template)
    if args.json:
        _print_json(workflow)
        return
    print(f"{workflow.id} version {workflow.version}: {workflow.name}")
    if workflow.description:
        print(workflow.description)
    fields = workflow.input_schema.get("fields", {})
    width = max((len(name) for name in fields), default=0)
    for name, field in fields.items():
        facts = [field.get("type", "?")] + ["required"] * bool(field.get("required"))
        facts += [f"{key} {field[key]}" for key in ("default", "min", "max", "maxLength", "enum") if key in field]
        about = f"  ({field['description']})" if field.get("description") else ""
        print(f"  --input {(name + '=...').ljust(width + 4)}  {', '.join(map(str, facts))}{about}")
    if not fields:
        print("  (no inputs)")


def _template_fields(args: argparse.Namespace) -> dict[str, Any]:
    fields = {"name": args.name, "description": args.description, "input_schema": _read_json(args.schema, "schema"),
              "default_params": _read_json(args.defaults, "defaults"), "limits": _read_json(args.limits, "limits"),
              "backend_tag": args.backend_tag}
    return {name: value for name, value in fields.items() if value is not None}


# A whole template file (as templates/*.json and `workflows show --json` have it): its API field names.
_TEMPLATE_FILE_FIELDS = {"name": "name", "description": "description", "inputSchema": "input_schema",
                         "defaultParams": "default_params", "limits": "limits", "backendTag": "backend_tag"}


def _workflows_add(gateway: GatewayClient, args: argparse.Namespace) -> None:
    document = _read_json(args.file, "workflow") or {}
    if "workflowJson" in document:  # a whole template; the options given override its fields
        graph = document["workflowJson"]
        fields = {ours: document[theirs] for theirs, ours in _TEMPLATE_FILE_FIELDS.items() if theirs in document}
        template = args.template or document.get("id")
    else:
        graph, fields, template = document, {}, args.template
    if not template:
        raise UsageError("--id names the template (a graph file has no id of its own)")
    answer = gateway.create_workflow(template, graph, **{**fields, **_template_fields(args)})
    _print_change(args, "registered", answer)


def _workflows_update(gateway: GatewayClient, args: argparse.Namespace) -> None:
    changes = _template_fields(args)
    if args.file is not None:
        changes["workflow_json"] = _read_json(args.file, "workflow")
    if not changes:
        raise UsageError("nothing to change: give a graph file or --name, --description, --schema, ...")
    # The API answers a change that changes nothing with the current version, writing none: told apart by the
    # version before it.
    before = gateway.get_workflow(args.template).version
    answer = gateway.update_workflow(args.template, **changes)
    _print_change(args, "updated" if answer.workflow.version != before else "unchanged", answer)


def _print_change(args: argparse.Namespace, what: str, answer: Any) -> None:
    if args.json:
        _print_json(answer)
        return
    print(f"{what} {answer.workflow.id} version {answer.workflow.version}")
    for warning in answer.warnings:
        print(f"warning: {warning}", file=sys.stderr)


def _workflows_delete(gateway: GatewayClient, args: argparse.Namespace) -> None:
    gateway.delete_workflow(args.template)
    if args.json:
        _print_json({"deleted": args.template})
    else:
        print(f"deleted {args.template}")
