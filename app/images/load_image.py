"""ComfyUI's side of image inputs: the `LoadImage` nodes of a graph that take a URL or inline image, and the
content-derived name an image is uploaded under (so uploading it again gives ComfyUI the same name)."""

from __future__ import annotations

import copy
from typing import Any

from app.images.decoding import LoadedImage
from app.images.sources import classify_image_source

_LOAD_IMAGE_CLASS = "LoadImage"
_LOAD_IMAGE_KEY_SUFFIX = ".image"


def comfy_upload_name(image: LoadedImage) -> str:
    """Named by content: the same image uploads under the same name, and ComfyUI keeps it as it is."""
    return f"gw_{image.sha256[:16]}.{image.extension}"


def load_image_key(node_id: str) -> str:
    return f"{node_id}{_LOAD_IMAGE_KEY_SUFFIX}"


def node_of(key: str) -> str:
    return key.removesuffix(_LOAD_IMAGE_KEY_SUFFIX)


def find_load_image_sources(prompt: dict[str, Any]) -> dict[str, str]:
    """"<node id>.image" → source, for every LoadImage node of an API-format graph whose image is a URL,
    a data URI, base64 or a stored image. Plain file names (already in ComfyUI's input folder) are left out."""
    sources = {}
    for node_id, node in prompt.items():
        if not isinstance(node, dict) or node.get("class_type") != _LOAD_IMAGE_CLASS:
            continue
        image = (node.get("inputs") or {}).get("image")
        if isinstance(image, str) and classify_image_source(image) is not None:
            sources[load_image_key(node_id)] = image
    return sources


def replace_load_image_sources(prompt: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """A copy of `prompt` with each "<node id>.image" of `names` set to its new value."""
    replaced = copy.deepcopy(prompt)
    for key, name in names.items():
        node = replaced.get(node_of(key)) if key.endswith(_LOAD_IMAGE_KEY_SUFFIX) else None
        if not isinstance(node, dict) or node.get("class_type") != _LOAD_IMAGE_CLASS:
            raise KeyError(f"{key!r} names no LoadImage node of this graph")
        node.setdefault("inputs", {})["image"] = name
    return replaced
