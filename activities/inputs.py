"""Staging a job's image inputs on the ComfyUI that will run it.

Each source (URL, or an inline image the API already put in storage) is loaded and checked, then uploaded under
a name derived from its content, so a retried activity uploads identical bytes under the same name and ComfyUI
answers with that name again. What travels back through Temporal is the names ComfyUI returned, never the bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import httpx
from temporalio import activity
from temporalio.exceptions import ApplicationError, ApplicationErrorCategory

from activities.comfy import to_application_error, unknown_backend
from activities.heartbeats import heartbeating
from activities.waiting import while_unreachable
from app.comfy.client import ComfyClient
from app.comfy.errors import ComfyError
from app.errors import ErrorCode
from app.images.decoding import ImageInputError, LoadedImage
from app.images.load_image import comfy_upload_name, replace_load_image_sources
from app.images.loading import load_image_source
from app.models import JobWarning, StageImagesInput, StageImagesResult, StepHeartbeat
from app.redaction import Redactor
from app.storage import OutputStorage, StorageError


def _image_input_failure(error: ImageInputError, redactor: Redactor) -> ApplicationError:
    """Bad input fails the job at once, naming the field (benign to the worker: it is the client's
    mistake, not the gateway's); trouble fetching is retried by Temporal. Under PRIVACY_MODE an image's URL
    is one of the job's free texts: out of the message before the SDK logs it."""
    bad_input = error.code is ErrorCode.VALIDATION_ERROR
    return ApplicationError(
        redactor.text(str(error)),
        {"fields": [{"field": error.field, "message": redactor.text(error.message)}]},
        type=error.code.value,
        non_retryable=bad_input,
        category=ApplicationErrorCategory.BENIGN if bad_input else ApplicationErrorCategory.UNSPECIFIED,
    )


class ImageStager:
    """Loads a job's image sources and uploads them to one ComfyUI under content-derived names."""

    def __init__(
        self, http: httpx.AsyncClient, storage: OutputStorage, *, max_bytes: int, max_pixels: int,
        allow_private_urls: bool,
    ) -> None:
        self._http = http
        self._storage = storage
        self._max_bytes = max_bytes
        self._max_pixels = max_pixels
        self._allow_private_urls = allow_private_urls

    async def stage(
        self, client: ComfyClient, job_id: str, images: dict[str, str], prompt: dict, *,
        on_wait: Callable[[JobWarning | None], None], on_staged: Callable[[int], None] = lambda done: None,
        max_wait: float | None, redactor: Redactor,
    ) -> StageImagesResult:
        loaded = await self.load(images, redactor)
        try:
            return await self.upload(client, job_id, loaded, prompt, on_wait=on_wait, on_staged=on_staged,
                                     max_wait=max_wait)
        except ComfyError as error:
            raise to_application_error(error, redactor) from (None if redactor else error)

    async def load(self, images: dict[str, str], redactor: Redactor) -> dict[str, LoadedImage]:
        """Each source fetched and checked: nothing of ComfyUI's is needed (or held) for this."""
        loaded: dict[str, LoadedImage] = {}
        for key, source in images.items():
            try:
                loaded[key] = await load_image_source(
                    source, http=self._http, max_bytes=self._max_bytes, max_pixels=self._max_pixels,
                    allow_private_urls=self._allow_private_urls, field=key, read_stored=self._read_stored,
                )
            except ImageInputError as error:
                raise _image_input_failure(error, redactor) from (None if redactor else error)
            except StorageError as error:  # a stored inline image could not be read back (the bucket is down)
                raise ApplicationError(f"{key}: {error}", type=ErrorCode.STORAGE_ERROR.value) from error
        return loaded

    async def upload(
        self, client: ComfyClient, job_id: str, images: dict[str, LoadedImage], prompt: dict, *,
        on_wait: Callable[[JobWarning | None], None], on_staged: Callable[[int], None] = lambda done: None,
        max_wait: float | None, give_up: Callable[[], bool] = lambda: False,
    ) -> StageImagesResult:
        """The loaded images uploaded to this ComfyUI; raises ComfyError (an unreachable one once `give_up()`
        or after `max_wait` seconds)."""
        names: dict[str, str] = {}
        for key, image in images.items():
            # Never overwrite: a different file under this name (not ours) makes ComfyUI pick a new name.
            names[key] = await while_unreachable(
                lambda: client.upload_image(
                    name=comfy_upload_name(image), data=image.data, content_type=image.content_type, overwrite=False
                ),
                on_wait=on_wait, give_up=give_up, max_wait=max_wait,
            )
            activity.logger.info("job %s: image input %s staged on ComfyUI as %s", job_id, key, names[key])
            on_staged(len(names))
        return StageImagesResult(names=names, prompt=replace_load_image_sources(prompt, names))

    def _read_stored(self, key: str) -> bytes:
        with self._storage.open(key) as stored:
            return stored.read()


class InputActivities:
    """Jobs from before the fleet stage their images in an activity of their own, on the main queue; later jobs
    stage them inside run_prompt, on the backend the prompt was placed on (ImageStager)."""

    def __init__(self, clients: Mapping[str, ComfyClient], stager: ImageStager) -> None:
        self._clients = clients
        self._stager = stager

    def _client(self, backend: str) -> ComfyClient:
        try:
            return self._clients[backend]
        except KeyError:
            raise unknown_backend(backend) from None

    @activity.defn(name="stage_images")
    async def stage_images(self, request: StageImagesInput) -> StageImagesResult:
        client = self._client(request.backend)
        beat = StepHeartbeat()

        def waiting(warning: JobWarning | None) -> None:
            beat.warning = warning

        def staged(done: int) -> None:
            beat.done = done

        async with heartbeating(lambda: beat.model_dump(by_alias=True)):
            return await self._stager.stage(
                client, request.job_id, request.images, request.prompt, on_wait=waiting, on_staged=staged,
                max_wait=request.timeout_seconds, redactor=Redactor(request.redacted_texts))
