"""The activity that stages a job's image inputs on the ComfyUI that will run it.

Each source (URL, or an inline image the API already put in storage) is loaded and checked, then uploaded under a name derived from its
content, so a retried activity uploads identical bytes under the same name and ComfyUI answers with that
name again. What travels back through Temporal is the names ComfyUI returned, never the bytes.
"""

from __future__ import annotations

from collections.abc import Mapping

import httpx
from temporalio import activity
from temporalio.exceptions import ApplicationError, ApplicationErrorCategory

from activities.comfy import to_application_error
from app.comfy.client import ComfyClient
from app.comfy.errors import ComfyError
from app.image_inputs import (
    VALIDATION_ERROR,
    ImageInputError,
    comfy_upload_name,
    load_image_source,
    replace_load_image_sources,
)
from app.models import StageImagesInput, StageImagesResult
from app.storage import OutputStorage


def _image_input_failure(error: ImageInputError) -> ApplicationError:
    """Bad input fails the job at once, naming the field (benign to the worker: it is the client's
    mistake, not the gateway's); trouble fetching is retried by Temporal."""
    bad_input = error.code == VALIDATION_ERROR
    return ApplicationError(
        str(error),
        {"fields": [{"field": error.field, "message": error.message}]},
        type=error.code,
        non_retryable=bad_input,
        category=ApplicationErrorCategory.BENIGN if bad_input else ApplicationErrorCategory.UNSPECIFIED,
    )


class InputActivities:
    def __init__(
        self,
        clients: Mapping[str, ComfyClient],
        http: httpx.AsyncClient,
        storage: OutputStorage,
        *,
        max_bytes: int,
        allow_private_urls: bool,
    ) -> None:
        self._clients = clients
        self._http = http
        self._storage = storage
        self._max_bytes = max_bytes
        self._allow_private_urls = allow_private_urls

    def _client(self, backend: str) -> ComfyClient:
        try:
            return self._clients[backend]
        except KeyError:
            raise ApplicationError(
                f"unknown ComfyUI backend {backend!r}", type="CONFIGURATION_ERROR", non_retryable=True
            )

    @activity.defn(name="stage_images")
    async def stage_images(self, request: StageImagesInput) -> StageImagesResult:
        client = self._client(request.backend)
        names: dict[str, str] = {}
        for key, source in request.images.items():
            names[key] = await self._stage(client, key, source)
            activity.logger.info("job %s: image input %s staged on ComfyUI as %s", request.job_id, key, names[key])
            activity.heartbeat(len(names))
        return StageImagesResult(names=names, prompt=replace_load_image_sources(request.prompt, names))

    def _read_stored(self, key: str) -> bytes:
        with self._storage.open(key) as stored:
            return stored.read()

    async def _stage(self, client: ComfyClient, key: str, source: str) -> str:
        try:
            image = await load_image_source(
                source, http=self._http, max_bytes=self._max_bytes, allow_private_urls=self._allow_private_urls,
                field=key, read_stored=self._read_stored,
            )
            # Never overwrite: a different file under this name (not ours) makes ComfyUI pick a new name.
            return await client.upload_image(
                name=comfy_upload_name(image), data=image.data, content_type=image.content_type, overwrite=False
            )
        except ImageInputError as error:
            raise _image_input_failure(error) from error
        except ComfyError as error:
            raise to_application_error(error) from error
