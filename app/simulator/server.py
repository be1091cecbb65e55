"""HTTP and WebSocket routes of the ComfyUI simulator, and the functions that build and run it.

THIS IS A SIMULATOR FOR TESTS AND DEMOS, not ComfyUI. It answers the API of a real ComfyUI 0.3.64
server (as recorded in /work/shared/comfyui) with the same routes, status codes, body shapes and
WebSocket events, runs a handful of model-free nodes for real (it writes real PNG/WEBP/APNG/WEBM/MP4
files), and has no GPU, models or frontend. /system_stats says `"simulator": true`.

    build_app(data_dir, time_scale=1.0, node_delay=0.0) -> aiohttp.web.Application
    run_simulator(host, port, data_dir, time_scale, node_delay)   # blocking

Every route is also served under /api, as ComfyUI does.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import mimetypes
import os
import sys
import uuid
from io import BytesIO
from pathlib import Path
from typing import Any

from aiohttp import web
from PIL import Image

from .executor import PromptExecutor, PromptWorker
from .interrupt import InterruptFlag
from .node_types import NodeEnvironment
from .paths import DataPaths
from .prompt_queue import SENSITIVE_EXTRA_DATA_KEYS, PromptQueue
from .registry import NODE_CLASS_MAPPINGS, node_info
from .validation import validate_prompt
from .websocket_hub import SERVER_FEATURES, LaneHub, MessageHub

logger = logging.getLogger(__name__)

# /view answers with the content type guessed from the extension; pin the ones outputs use, since
# the system's mime tables (which mimetypes also reads) vary between machines.
for _content_type, _extension in (("image/png", ".png"), ("image/webp", ".webp"), ("video/webm", ".webm"), ("video/mp4", ".mp4")):
    mimetypes.add_type(_content_type, _extension)

DEFAULT_DATA_DIR = Path("comfyui-simulator-data")
MAX_UPLOAD_SIZE = SERVER_FEATURES["max_upload_size"]

# What the recorded server reported about itself; the simulator keeps these so clients that read
# versions see the ones of the ComfyUI it imitates.
COMFYUI_VERSION = "0.3.64"
REQUIRED_FRONTEND_VERSION = "1.27.10"
TEMPLATES_VERSION = "0.1.95"
PYTORCH_VERSION = "2.13.0+cpu"


class SimulatedComfyUI:
    """The state of one simulated ComfyUI process: queue, history, caches, sockets, counters."""

    def __init__(self, data_dir: Path, time_scale: float, node_delay: float, parallel: int = 1):
        self.paths = DataPaths(data_dir)
        self.env = NodeEnvironment(self.paths, time_scale=time_scale, node_delay=node_delay)
        self.hub = MessageHub()
        self.interrupt = InterruptFlag()
        self.queue = PromptQueue(on_change=self._broadcast_status, interrupt=self.interrupt)
        self.executor = PromptExecutor(self.hub, self.env, self.interrupt)
        self.workers = [PromptWorker(self.queue, self.executor, self.hub)]
        # Parallel lanes (benchmarks only; a real ComfyUI runs one prompt at a time): each more lane runs
        # prompts from the same queue with its own executor (its own caches), interrupt flag and hub view.
        for lane in range(1, parallel):
            executor = PromptExecutor(LaneHub(self.hub), self.env, InterruptFlag(poll_interval=None))
            self.workers.append(PromptWorker(self.queue, executor, executor.hub, name=f"lane-{lane}", idle_wait=None))
        self.number = 0
        self._publisher: asyncio.Task | None = None

    def _broadcast_status(self) -> None:
        self.hub.send_sync("status", {"status": self._queue_info()})

    def _queue_info(self) -> dict[str, Any]:
        return {"exec_info": {"queue_remaining": self.queue.tasks_remaining()}}

    # lifecycle ------------------------------------------------------------------------------

    async def start(self, app: web.Application) -> None:
        self.paths.prepare()
        self.hub.bind_loop(asyncio.get_running_loop())
        self._publisher = asyncio.create_task(self.hub.publish_loop())
        for worker in self.workers:
            worker.start()
        logger.warning(
            "ComfyUI SIMULATOR started (tests and demos only, not a real ComfyUI): data dir %s, "
            "time_scale %s, node_delay %ss",
            self.paths.root,
            self.env.time_scale,
            self.env.node_delay,
        )

    async def close_sockets(self, app: web.Application) -> None:
        await self.hub.close_all()

    async def stop(self, app: web.Application) -> None:
        await asyncio.gather(*(asyncio.to_thread(worker.stop) for worker in self.workers))
        if self._publisher is not None:
            self._publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._publisher

    # routes ---------------------------------------------------------------------------------

    def routes(self) -> web.RouteTableDef:
        routes = web.RouteTableDef()
        routes.get("/ws")(self.websocket)
        routes.get("/system_stats")(self.system_stats)
        routes.get("/features")(self.features)
        routes.get("/object_info")(self.object_info)
        routes.get("/object_info/{node_class}")(self.object_info_node)
        routes.get("/prompt")(self.get_prompt)
        routes.post("/prompt")(self.post_prompt)
        routes.get("/queue")(self.get_queue)
        routes.post("/queue")(self.post_queue)
        routes.post("/interrupt")(self.post_interrupt)
        routes.post("/free")(self.post_free)
        routes.get("/history")(self.get_history)
        routes.get("/history/{prompt_id}")(self.get_history_prompt)
        routes.post("/history")(self.post_history)
        routes.post("/upload/image")(self.upload_image)
        routes.get("/view")(self.view)
        return routes

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        return await self.hub.handle_websocket(request, self.queue.tasks_remaining())

    async def system_stats(self, request: web.Request) -> web.Response:
        ram_total, ram_free = _memory()
        return web.json_response(
            {
                "system": {
                    "os": os.name,
                    "ram_total": ram_total,
                    "ram_free": ram_free,
                    "comfyui_version": COMFYUI_VERSION,
                    "required_frontend_version": REQUIRED_FRONTEND_VERSION,
                    "installed_templates_version": TEMPLATES_VERSION,
                    "required_templates_version": TEMPLATES_VERSION,
                    "python_version": sys.version,
                    "pytorch_version": PYTORCH_VERSION,
                    "embedded_python": False,
                    "argv": sys.argv,
                    "simulator": True,
                },
                "devices": [
                    {
                        "name": "cpu",
                        "type": "cpu",
                        "index": None,
                        "vram_total": ram_total,
                        "vram_free": ram_free,
                        "torch_vram_total": ram_total,
                        "torch_vram_free": ram_free,
                    }
                ],
            }
        )

    async def features(self, request: web.Request) -> web.Response:
        return web.json_response(dict(SERVER_FEATURES))

    async def object_info(self, request: web.Request) -> web.Response:
        return web.json_response({class_type: node_info(class_type, self.env) for class_type in NODE_CLASS_MAPPINGS})

    async def object_info_node(self, request: web.Request) -> web.Response:
        class_type = request.match_info["node_class"]
        if class_type not in NODE_CLASS_MAPPINGS:
            return web.json_response({})
        return web.json_response({class_type: node_info(class_type, self.env)})

    async def get_prompt(self, request: web.Request) -> web.Response:
        return web.json_response(self._queue_info())

    async def post_prompt(self, request: web.Request) -> web.Response:
        # Written like ComfyUI's handler on purpose: a body that is not JSON, or of the wrong
        # shape, raises here and aiohttp answers 500 "Server got itself in trouble", as recorded.
        logger.info("got prompt")
        json_data = await request.json()
        if "number" in json_data:
            number: float | int = float(json_data["number"])
        else:
            number = self.number
            if "front" in json_data and json_data["front"]:
                number = -number
            # The counter moves for every POST, even one that fails validation.
            self.number += 1

        if "prompt" not in json_data:
            error = {"type": "no_prompt", "message": "No prompt provided", "details": "No prompt provided", "extra_info": {}}
            return web.json_response({"error": error, "node_errors": {}}, status=400)

        prompt = json_data["prompt"]
        prompt_id = str(json_data.get("prompt_id", uuid.uuid4()))
        valid, error, outputs_to_execute, node_errors = validate_prompt(
            prompt, json_data.get("partial_execution_targets"), self.env
        )
        extra_data = json_data["extra_data"] if "extra_data" in json_data else {}
        if "client_id" in json_data:
            extra_data["client_id"] = json_data["client_id"]
        if not valid:
            logger.warning("invalid prompt: %s", error)
            return web.json_response({"error": error, "node_errors": node_errors}, status=400)
        sensitive = {key: extra_data.pop(key) for key in SENSITIVE_EXTRA_DATA_KEYS if key in extra_data}
        self.queue.put((number, prompt_id, prompt, extra_data, outputs_to_execute, sensitive))
        return web.json_response({"prompt_id": prompt_id, "number": number, "node_errors": node_errors})

    async def get_queue(self, request: web.Request) -> web.Response:
        running, pending = self.queue.running_and_pending()
        return web.json_response({"queue_running": running, "queue_pending": pending})

    async def post_queue(self, request: web.Request) -> web.Response:
        json_data = await request.json()
        if "clear" in json_data and json_data["clear"]:
            self.queue.wipe_queue()
        if "delete" in json_data:
            for prompt_id in json_data["delete"]:
                self.queue.delete_queue_item(prompt_id)
        return web.Response(status=200)

    async def post_interrupt(self, request: web.Request) -> web.Response:
        try:
            json_data = await request.json()
        except json.JSONDecodeError:
            json_data = {}
        prompt_id = json_data.get("prompt_id")
        if prompt_id:
            if self.queue.interrupt_if_running(prompt_id):
                logger.info("Interrupting prompt %s", prompt_id)
            else:
                logger.info("Prompt %s is not currently running, skipping interrupt", prompt_id)
        else:
            logger.info("Global interrupt (no prompt_id specified)")
            self.interrupt.set()
            self.queue.interrupt_all_running()  # the other lanes' prompts (parallel lanes only)
        return web.Response(status=200)

    async def post_free(self, request: web.Request) -> web.Response:
        json_data = await request.json()
        # There are no models to unload; free_memory drops the output cache as in ComfyUI.
        if json_data.get("free_memory", False):
            self.queue.set_flag("free_memory", True)
        return web.Response(status=200)

    async def get_history(self, request: web.Request) -> web.Response:
        max_items = request.rel_url.query.get("max_items")
        offset = request.rel_url.query.get("offset")
        return web.json_response(
            self.queue.get_history(
                max_items=int(max_items) if max_items is not None else None,
                offset=int(offset) if offset is not None else -1,
            )
        )

    async def get_history_prompt(self, request: web.Request) -> web.Response:
        return web.json_response(self.queue.get_history(prompt_id=request.match_info["prompt_id"]))

    async def post_history(self, request: web.Request) -> web.Response:
        json_data = await request.json()
        if "clear" in json_data and json_data["clear"]:
            self.queue.wipe_history()
        if "delete" in json_data:
            for prompt_id in json_data["delete"]:
                self.queue.delete_history_item(prompt_id)
        return web.Response(status=200)

    async def upload_image(self, request: web.Request) -> web.Response:
        post = await request.post()
        image = post.get("image")
        overwrite = post.get("overwrite")
        upload_type = post.get("type")
        if upload_type is None:
            upload_type = "input"
        upload_dir = self.paths.directory_by_type(upload_type)
        if upload_dir is None:
            raise ValueError(f"unknown upload type {upload_type!r}")  # ComfyUI fails with a 500 here too
        if not (image and image.file):
            return web.Response(status=400)
        filename = image.filename
        if not filename:
            return web.Response(status=400)

        subfolder = post.get("subfolder", "")
        folder = os.path.join(upload_dir, os.path.normpath(subfolder))
        filepath = os.path.abspath(os.path.join(folder, filename))
        if os.path.commonpath((upload_dir, filepath)) != upload_dir:
            return web.Response(status=400)
        os.makedirs(folder, exist_ok=True)

        content = image.file.read()
        is_duplicate = False
        if overwrite not in ("true", "1"):
            stem, extension = os.path.splitext(filename)
            suffix = 1
            while os.path.exists(filepath):
                if _same_content(filepath, content):
                    is_duplicate = True
                    break
                filename = f"{stem} ({suffix}){extension}"
                filepath = os.path.join(folder, filename)
                suffix += 1
        if not is_duplicate:
            with open(filepath, "wb") as f:
                f.write(content)
        return web.json_response({"name": filename, "subfolder": subfolder, "type": upload_type})

    async def view(self, request: web.Request) -> web.StreamResponse:
        query = request.rel_url.query
        if "filename" not in query:
            return web.Response(status=404)
        filename, output_dir = self.paths.annotated_filepath(query["filename"])
        if not filename:
            return web.Response(status=400)
        if filename[0] == "/" or ".." in filename:
            return web.Response(status=400)
        if output_dir is None:
            output_dir = self.paths.directory_by_type(query.get("type", "output"))
        if output_dir is None:
            return web.Response(status=400)
        if "subfolder" in query:
            full_output_dir = os.path.join(output_dir, query["subfolder"])
            if os.path.commonpath((os.path.abspath(full_output_dir), output_dir)) != output_dir:
                return web.Response(status=403)
            output_dir = full_output_dir

        filename = os.path.basename(filename)
        file = os.path.join(output_dir, filename)
        if not os.path.isfile(file):
            return web.Response(status=404)
        disposition = {"Content-Disposition": f'filename="{filename}"'}
        if "preview" in query:
            return _preview_response(file, query["preview"], query.get("channel", ""), disposition)
        channel = query.get("channel", "rgba")
        if channel in ("rgb", "a"):
            return _channel_response(file, channel, disposition)
        content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        if content_type in {"text/html", "text/html-sandboxed", "application/xhtml+xml", "text/javascript", "text/css"}:
            content_type = "application/octet-stream"  # force a download rather than rendering
        return web.FileResponse(file, headers={**disposition, "Content-Type": content_type})


def _preview_response(file: str, preview: str, channel: str, headers: dict[str, str]) -> web.Response:
    """`preview=webp;Q` or `jpeg;Q`: the image re-encoded at quality Q (90 by default)."""
    preview_info = preview.split(";")
    image_format = preview_info[0]
    if image_format not in ("webp", "jpeg") or "a" in channel:
        image_format = "webp"
    quality = int(preview_info[-1]) if preview_info[-1].isdigit() else 90
    with Image.open(file) as img:
        if image_format == "jpeg" or channel == "rgb":
            img = img.convert("RGB")
        buffer = BytesIO()
        img.save(buffer, format=image_format, quality=quality)
    return web.Response(body=buffer.getvalue(), content_type=f"image/{image_format}", headers=headers)


def _channel_response(file: str, channel: str, headers: dict[str, str]) -> web.Response:
    """`channel=rgb`: the image without alpha; `channel=a`: its alpha as an RGBA mask."""
    with Image.open(file) as img:
        if channel == "rgb":
            result = Image.merge("RGB", img.split()[:3]) if img.mode == "RGBA" else img.convert("RGB")
        else:
            alpha = img.split()[3] if img.mode == "RGBA" else Image.new("L", img.size, 255)
            result = Image.new("RGBA", img.size)
            result.putalpha(alpha)
        buffer = BytesIO()
        result.save(buffer, format="PNG")
    return web.Response(body=buffer.getvalue(), content_type="image/png", headers=headers)


def _same_content(path: str, content: bytes) -> bool:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).digest() == hashlib.sha256(content).digest()


def _memory() -> tuple[int, int]:
    """(total, available) RAM in bytes, reported as the CPU device's memory as ComfyUI --cpu does."""
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0, 0


SIMULATOR_KEY = web.AppKey("comfyui_simulator", SimulatedComfyUI)


def build_app(data_dir: Path, time_scale: float = 1.0, node_delay: float = 0.0, parallel: int = 1) -> web.Application:
    """An aiohttp app serving the simulated ComfyUI API. The worker thread starts, and temp/ is
    wiped, when the app starts; output/ and input/ under `data_dir` persist across restarts.
    `parallel` > 1 runs that many prompts at once (benchmarks only: ComfyUI runs one at a time)."""
    simulator = SimulatedComfyUI(Path(data_dir), time_scale, node_delay, parallel)
    app = web.Application(client_max_size=MAX_UPLOAD_SIZE)
    app[SIMULATOR_KEY] = simulator
    routes = simulator.routes()
    api_routes = web.RouteTableDef()
    for route in routes:
        api_routes.route(route.method, "/api" + route.path)(route.handler)
    app.add_routes(api_routes)
    app.add_routes(routes)
    app.on_startup.append(simulator.start)
    app.on_shutdown.append(simulator.close_sockets)
    app.on_cleanup.append(simulator.stop)
    return app


def run_simulator(
    host: str = "127.0.0.1",
    port: int = 8188,
    data_dir: Path = DEFAULT_DATA_DIR,
    time_scale: float = 1.0,
    node_delay: float = 0.0,
    parallel: int = 1,
) -> None:
    """Serve the simulator until interrupted (Ctrl-C)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.warning("ComfyUI SIMULATOR (tests and demos only) listening on http://%s:%s", host, port)
    web.run_app(build_app(data_dir, time_scale, node_delay, parallel), host=host, port=port, access_log=None, print=None)


def run_simulators(
    count: int, host: str = "127.0.0.1", port: int = 8188, data_dir: Path = DEFAULT_DATA_DIR,
    time_scale: float = 1.0, node_delay: float = 0.0, parallel: int = 1,
) -> None:
    """Serve `count` simulated ComfyUI servers from one process until interrupted, on ports `port` to
    `port + count - 1`, each as one real server is (one GPU: one prompt at a time, unless `parallel` says
    otherwise; its own queue, history and data dir `data_dir/<n>`): a farm of backends for a benchmark that
    must run many prompts at once, without a process per backend."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def serve() -> None:
        runners = []
        try:
            for number in range(count):
                runner = web.AppRunner(build_app(Path(data_dir) / str(number + 1), time_scale, node_delay, parallel),
                                       access_log=None)
                await runner.setup()
                await web.TCPSite(runner, host, port + number).start()
                runners.append(runner)
            logger.warning("%d ComfyUI SIMULATORS (tests and demos only) listening on http://%s:%s to %s",
                           count, host, port, port + count - 1)
            await asyncio.Event().wait()
        finally:
            for runner in runners:
                await runner.cleanup()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
