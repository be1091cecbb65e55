"""The models a ComfyUI can load, by type, read from its loader nodes' `/object_info` choices."""

from __future__ import annotations

import asyncio
from typing import Any

from app.comfy.client import ComfyClient

# model type → (loader node, the input whose choices are the installed files)
MODEL_LOADERS = {
    "checkpoints": ("CheckpointLoaderSimple", "ckpt_name"),
    "loras": ("LoraLoader", "lora_name"),
    "vae": ("VAELoader", "vae_name"),
    "controlnet": ("ControlNetLoader", "control_net_name"),
    "upscale_models": ("UpscaleModelLoader", "model_name"),
}


def combo_choices(spec: Any) -> list[str]:
    """A combo input's choices in either of ComfyUI's forms: `[["a", "b"], {...}]` or
    `["COMBO", {"options": ["a", "b"]}]`."""
    if not isinstance(spec, list) or not spec:
        return []
    if isinstance(spec[0], list):
        return [str(choice) for choice in spec[0]]
    if spec[0] == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict):
        return [str(choice) for choice in spec[1].get("options", [])]
    return []


async def installed_models(client: ComfyClient) -> dict[str, list[str]]:
    """Empty lists for a loader ComfyUI does not have (it answers `{}` for an unknown node type)."""
    infos = await asyncio.gather(*(client.object_info(node) for node, _ in MODEL_LOADERS.values()))
    models = {}
    for (kind, (node, input_name)), info in zip(MODEL_LOADERS.items(), infos):
        inputs = info.get(node, {}).get("input", {})
        spec = inputs.get("required", {}).get(input_name) or inputs.get("optional", {}).get(input_name)
        models[kind] = combo_choices(spec)
    return models
