"""Every bundled template registers; the model-free ones run end to end on ComfyUI (the simulator)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from aiohttp import web
from PIL import Image
from temporalio.client import Client

from app.comfy.models import combo_choices
from app.templates.registry import check_template
from app.templates.store import BUNDLED_TEMPLATES_DIR, read_template_file
from tests.harness import Gateway, SimulatorProcess, api_client, gateway_settings, migrate_database, serve_locally

BUNDLED = sorted(BUNDLED_TEMPLATES_DIR.glob("*.json"))


@pytest.mark.parametrize("path", BUNDLED, ids=[path.stem for path in BUNDLED])
def test_bundled_template_passes_registration(path: Path) -> None:
    check_template(read_template_file(path))


async def test_all_bundled_templates_are_registered_at_start(gateway: Gateway) -> None:
    assert BUNDLED, f"no templates in {BUNDLED_TEMPLATES_DIR}"  # else both sides below would be empty
    listed = {w["id"] for w in (await gateway.api.get("/workflows")).json()["workflows"]}
    assert listed == {path.stem for path in BUNDLED}
    assert set((await gateway.api.get("/capabilities")).json()["workflows"]) == listed


async def test_solid_color_template_runs(gateway: Gateway) -> None:
    job = await gateway.run({"workflowId": "solid_color", "inputs": {"width": 40, "height": 30, "color": 0xFF0000}})
    assert job["status"] == "succeeded"
    image = Image.open(io.BytesIO((await gateway.api.get(job["outputs"][0]["url"])).content)).convert("RGB")
    assert image.size == (40, 30) and image.getpixel((5, 5)) == (255, 0, 0)


async def test_animated_webp_template_runs(gateway: Gateway) -> None:
    job = await gateway.run({"workflowId": "animated_noise_webp", "inputs": {"width": 64, "height": 64, "frames": 6}})
    assert job["status"] == "succeeded" and job["seed"] is not None
    [output] = job["outputs"]
    assert output["animated"] is True and output["contentType"] == "image/webp"
    image = Image.open(io.BytesIO((await gateway.api.get(output["url"])).content))
    assert image.n_frames == 6 and image.size == (64, 64)


# A ComfyUI's `/object_info/<loader>` answers with a few models installed, in both of its combo forms; it
# has no ControlNetLoader, so that one answers `{}`, as ComfyUI does for a node type it does not know.
LOADER_INFO = {
    "CheckpointLoaderSimple": {"input": {"required": {
        "ckpt_name": [["sd_xl_base_1.0.safetensors", "v1-5-pruned-emaonly.ckpt"],
                      {"tooltip": "The name of the checkpoint (model) to load."}],
    }}},
    "LoraLoader": {"input": {"required": {
        "model": ["MODEL", {}], "clip": ["CLIP", {}],
        "lora_name": ["COMBO", {"options": ["add_detail.safetensors"], "tooltip": "The name of the LoRA."}],
        "strength_model": ["FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0}],
    }}},
    "VAELoader": {"input": {"required": {"vae_name": [["sdxl_vae.safetensors", "taesd"], {}]}}},
    "UpscaleModelLoader": {"input": {"required": {
        "model_name": ["COMBO", {"options": ["4x-UltraSharp.pth", "RealESRGAN_x2plus.pth"]}],
    }}},
}


async def test_models_lists_what_comfyuis_loader_nodes_offer(
    temporal_client: Client, task_queue: str, tmp_path: Path
) -> None:
    async def object_info(request: web.Request) -> web.Response:
        node = request.match_info["node"]
        return web.json_response({node: LOADER_INFO[node]} if node in LOADER_INFO else {})

    comfyui = web.Application()
    comfyui.router.add_get("/object_info/{node}", object_info)
    async with serve_locally(comfyui) as comfyui_url:
        settings = gateway_settings(temporal_client, comfyui_url, tmp_path, task_queue)
        migrate_database(settings)
        async with api_client(settings, temporal_client) as api:
            response = await api.get("/models")
    assert response.status_code == 200, response.text
    assert response.json() == {
        "checkpoints": ["sd_xl_base_1.0.safetensors", "v1-5-pruned-emaonly.ckpt"],
        "loras": ["add_detail.safetensors"],
        "vae": ["sdxl_vae.safetensors", "taesd"],
        "controlnet": [],
        "upscaleModels": ["4x-UltraSharp.pth", "RealESRGAN_x2plus.pth"],
    }


async def test_the_simulator_has_no_models(gateway: Gateway) -> None:
    if not isinstance(gateway.comfyui, SimulatorProcess):
        pytest.skip("a real ComfyUI lists the models it has installed")
    # The simulator, like a ComfyUI without model loaders, has none of these nodes: every list is empty.
    assert (await gateway.api.get("/models")).json() == {
        "checkpoints": [], "loras": [], "vae": [], "controlnet": [], "upscaleModels": []}


def test_combo_choices_in_both_of_comfyuis_forms() -> None:
    assert combo_choices([["a.safetensors", "b.safetensors"], {"tooltip": "x"}]) == ["a.safetensors", "b.safetensors"]
    assert combo_choices(["COMBO", {"options": ["c.pt"]}]) == ["c.pt"]
    assert combo_choices(["INT", {"default": 1}]) == [] and combo_choices(None) == []
