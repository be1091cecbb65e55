"""Every bundled template registers; the model-free ones run end to end on ComfyUI (the simulator)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from app.comfy.models import combo_choices
from app.templates.registry import check_template
from app.templates.store import BUNDLED_TEMPLATES_DIR, read_template_file
from tests.harness import Gateway, SimulatorProcess

BUNDLED = sorted(BUNDLED_TEMPLATES_DIR.glob("*.json"))


@pytest.mark.parametrize("path", BUNDLED, ids=[path.stem for path in BUNDLED])
def test_bundled_template_passes_registration(path: Path) -> None:
    check_template(read_template_file(path))


async def test_all_bundled_templates_are_registered_at_start(gateway: Gateway) -> None:
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


async def test_models_lists_what_comfyui_can_load(gateway: Gateway) -> None:
    models = (await gateway.api.get("/models")).json()
    assert set(models) == {"checkpoints", "loras", "vae", "controlnet", "upscaleModels"}
    assert all(isinstance(name, str) for names in models.values() for name in names)
    if isinstance(gateway.comfyui, SimulatorProcess):
        # The simulator, like a ComfyUI without model loaders, has none of these nodes: every list is empty.
        assert all(names == [] for names in models.values())


def test_combo_choices_in_both_of_comfyuis_forms() -> None:
    assert combo_choices([["a.safetensors", "b.safetensors"], {"tooltip": "x"}]) == ["a.safetensors", "b.safetensors"]
    assert combo_choices(["COMBO", {"options": ["c.pt"]}]) == ["c.pt"]
    assert combo_choices(["INT", {"default": 1}]) == [] and combo_choices(None) == []
