"""The built-in ComfyUI nodes the simulator provides, with ComfyUI 0.3.64's inputs.

Input names, defaults, min/max and combo choices are ComfyUI's, so prompts validate (and fail
validation) exactly as on the real server. Images flow between nodes as ImageBatch (Pillow frames)
instead of tensors; every save node writes a real file with ComfyUI's naming.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from fractions import Fraction
from typing import Any

from PIL import Image, ImageChops, ImageOps, ImageSequence

from . import media
from .images import ImageBatch
from .node_types import NodeEnvironment, NodeOutput, NodeRunContext, SimulatedNode

MAX_RESOLUTION = 16384
_HIDDEN_PROMPT_INPUTS = {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}
_FILENAME_PREFIX_TOOLTIP = (
    "The prefix for the file to save. This may include formatting information such as "
    "%date:yyyy-MM-dd% or %Empty Latent Image.width% to include values from nodes."
)


def _next_output_file(ctx: NodeRunContext, filename_prefix: str, width: int, height: int, extension: str) -> tuple[str, dict]:
    """The path of the next `<prefix>_<counter>_.<ext>` output file and its entry in the node's UI output."""
    paths = ctx.env.paths
    folder, filename, counter, subfolder, _ = paths.get_save_image_path(filename_prefix, paths.output_dir, width, height)
    file = f"{filename}_{counter:05}_.{extension}"
    return os.path.join(folder, file), {"filename": file, "subfolder": subfolder, "type": "output"}


class EmptyImage(SimulatedNode):
    RETURN_TYPES = ("IMAGE",)
    CATEGORY = "image"

    @classmethod
    def INPUT_TYPES(cls, env: NodeEnvironment) -> dict:
        return {
            "required": {
                "width": ("INT", {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}),
                "height": ("INT", {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096}),
                "color": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFF, "step": 1, "display": "color"}),
            }
        }

    def run(self, ctx: NodeRunContext, width: int, height: int, batch_size: int = 1, color: int = 0) -> NodeOutput:
        rgb = ((color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF)
        return NodeOutput((ImageBatch([Image.new("RGB", (width, height), rgb) for _ in range(batch_size)]),))


class SaveImage(SimulatedNode):
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    CATEGORY = "image"
    DESCRIPTION = "Saves the input images to your ComfyUI output directory."
    DISPLAY_NAME = "Save Image"
    FOLDER_TYPE = "output"
    COMPRESS_LEVEL = 4

    @classmethod
    def INPUT_TYPES(cls, env: NodeEnvironment) -> dict:
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The images to save."}),
                "filename_prefix": ("STRING", {"default": "ComfyUI", "tooltip": _FILENAME_PREFIX_TOOLTIP}),
            },
            "hidden": dict(_HIDDEN_PROMPT_INPUTS),
        }

    def filename_suffix(self) -> str:
        return ""

    def run(self, ctx: NodeRunContext, images: ImageBatch, filename_prefix: str = "ComfyUI") -> NodeOutput:
        paths = ctx.env.paths
        output_dir = paths.directory_by_type(self.FOLDER_TYPE)
        folder, filename, counter, subfolder, _ = paths.get_save_image_path(
            filename_prefix + self.filename_suffix(), output_dir, images.width, images.height
        )
        results = []
        for batch_number, frame in enumerate(images.frames):
            file = f"{filename.replace('%batch_num%', str(batch_number))}_{counter:05}_.png"
            media.save_png(frame, os.path.join(folder, file), ctx.prompt, ctx.extra_pnginfo, self.COMPRESS_LEVEL)
            results.append({"filename": file, "subfolder": subfolder, "type": self.FOLDER_TYPE})
            counter += 1
        return NodeOutput(ui={"images": results})


class PreviewImage(SaveImage):
    DISPLAY_NAME = "Preview Image"
    FOLDER_TYPE = "temp"
    COMPRESS_LEVEL = 1

    def __init__(self) -> None:
        # ComfyUI's alphabet, typo included ("p" twice, no "w"); one suffix per node instance,
        # and instances are reused while the node id stays in consecutive prompts.
        self.temp_suffix = "_temp_" + "".join(random.choice("abcdefghijklmnopqrstupvxyz") for _ in range(5))

    @classmethod
    def INPUT_TYPES(cls, env: NodeEnvironment) -> dict:
        return {"required": {"images": ("IMAGE",)}, "hidden": dict(_HIDDEN_PROMPT_INPUTS)}

    def filename_suffix(self) -> str:
        return self.temp_suffix

    def run(self, ctx: NodeRunContext, images: ImageBatch) -> NodeOutput:
        return super().run(ctx, images, "ComfyUI")


class LoadImage(SimulatedNode):
    RETURN_TYPES = ("IMAGE", "MASK")
    CATEGORY = "image"
    DISPLAY_NAME = "Load Image"

    @classmethod
    def INPUT_TYPES(cls, env: NodeEnvironment) -> dict:
        return {"required": {"image": (env.paths.list_input_images(), {"image_upload": True})}}

    @classmethod
    def IS_CHANGED(cls, env: NodeEnvironment, image: str) -> str:
        with open(env.paths.get_annotated_filepath(image), "rb") as f:
            return hashlib.sha256(f.read()).digest().hex()

    @classmethod
    def VALIDATE_INPUTS(cls, env: NodeEnvironment, image: str) -> bool | str:
        if not env.paths.exists_annotated_filepath(image):
            return "Invalid image file: {}".format(image)
        return True

    def run(self, ctx: NodeRunContext, image: str) -> NodeOutput:
        frames, masks = [], []
        with Image.open(ctx.env.paths.get_annotated_filepath(image)) as source:
            size = None
            for frame in ImageSequence.Iterator(source):
                frame = ImageOps.exif_transpose(frame)
                rgb = frame.convert("RGB")
                size = size or rgb.size
                if rgb.size != size:
                    continue
                frames.append(rgb)
                # ComfyUI's mask is 1 - alpha, or an empty 64x64 mask when there is no alpha.
                masks.append(ImageOps.invert(frame.getchannel("A")) if "A" in frame.getbands() else Image.new("L", (64, 64), 0))
        return NodeOutput((ImageBatch(frames), ImageBatch(masks)))


class ImageInvert(SimulatedNode):
    RETURN_TYPES = ("IMAGE",)
    CATEGORY = "image"
    DISPLAY_NAME = "Invert Image"

    @classmethod
    def INPUT_TYPES(cls, env: NodeEnvironment) -> dict:
        return {"required": {"image": ("IMAGE",)}}

    def run(self, ctx: NodeRunContext, image: ImageBatch) -> NodeOutput:
        return NodeOutput((ImageBatch([ImageOps.invert(frame) for frame in image.frames]),))


class ImageAddNoise(SimulatedNode):
    RETURN_TYPES = ("IMAGE",)
    CATEGORY = "image"
    PYTHON_MODULE = "comfy_extras.nodes_images"

    @classmethod
    def INPUT_TYPES(cls, env: NodeEnvironment) -> dict:
        return {
            "required": {
                "image": ("IMAGE",),
                "seed": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 0xFFFFFFFFFFFFFFFF,
                        "control_after_generate": True,
                        "tooltip": "The random seed used for creating the noise.",
                    },
                ),
                "strength": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01}),
            }
        }

    def run(self, ctx: NodeRunContext, image: ImageBatch, seed: int, strength: float) -> NodeOutput:
        # ComfyUI adds strength * N(0, 1) noise per pixel and channel. Pillow has no seeded
        # Gaussian source, so this adds seeded uniform noise with the same standard deviation
        # (uniform on +-sqrt(3) * strength); every frame draws fresh noise, so frames differ.
        rng = random.Random(seed)
        amplitude = 3 ** 0.5 * strength * 255
        raise_lut = [min(255, round(max(0.0, v - 127.5) / 127.5 * amplitude)) for v in range(256)] * 3
        lower_lut = [min(255, round(max(0.0, 127.5 - v) / 127.5 * amplitude)) for v in range(256)] * 3
        noisy = []
        for frame in image.frames:
            noise = Image.frombytes("RGB", frame.size, rng.randbytes(frame.width * frame.height * 3))
            brighter = ImageChops.add(frame, noise.point(raise_lut))
            noisy.append(ImageChops.subtract(brighter, noise.point(lower_lut)))
        return NodeOutput((ImageBatch(noisy),))


class SaveAnimatedWEBP(SimulatedNode):
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    CATEGORY = "image/animation"
    PYTHON_MODULE = "comfy_extras.nodes_images"
    COMPRESS_METHODS = {"default": 4, "fastest": 0, "slowest": 6}

    @classmethod
    def INPUT_TYPES(cls, env: NodeEnvironment) -> dict:
        return {
            "required": {
                "images": ("IMAGE",),
                "filename_prefix": ("STRING", {"default": "ComfyUI"}),
                "fps": ("FLOAT", {"default": 6.0, "min": 0.01, "max": 1000.0, "step": 0.01}),
                "lossless": ("BOOLEAN", {"default": True}),
                "quality": ("INT", {"default": 80, "min": 0, "max": 100}),
                "method": (list(cls.COMPRESS_METHODS),),
            },
            "hidden": dict(_HIDDEN_PROMPT_INPUTS),
        }

    def run(
        self, ctx: NodeRunContext, images: ImageBatch, filename_prefix: str, fps: float, lossless: bool, quality: int, method: str
    ) -> NodeOutput:
        path, result = _next_output_file(ctx, filename_prefix, images.width, images.height, "webp")
        media.save_animated_webp(
            images, path, fps, lossless, quality, self.COMPRESS_METHODS[method], ctx.prompt, ctx.extra_pnginfo
        )
        return NodeOutput(ui={"images": [result], "animated": [len(images) > 1]})


class SaveAnimatedPNG(SimulatedNode):
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    CATEGORY = "image/animation"
    PYTHON_MODULE = "comfy_extras.nodes_images"

    @classmethod
    def INPUT_TYPES(cls, env: NodeEnvironment) -> dict:
        return {
            "required": {
                "images": ("IMAGE",),
                "filename_prefix": ("STRING", {"default": "ComfyUI"}),
                "fps": ("FLOAT", {"default": 6.0, "min": 0.01, "max": 1000.0, "step": 0.01}),
                "compress_level": ("INT", {"default": 4, "min": 0, "max": 9}),
            },
            "hidden": dict(_HIDDEN_PROMPT_INPUTS),
        }

    def run(self, ctx: NodeRunContext, images: ImageBatch, filename_prefix: str, fps: float, compress_level: int) -> NodeOutput:
        path, result = _next_output_file(ctx, filename_prefix, images.width, images.height, "png")
        media.save_animated_png(images, path, fps, compress_level, ctx.prompt, ctx.extra_pnginfo)
        return NodeOutput(ui={"images": [result], "animated": [len(images) > 1]})


class SaveWEBM(SimulatedNode):
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    CATEGORY = "image/video"
    PYTHON_MODULE = "comfy_extras.nodes_video"

    @classmethod
    def INPUT_TYPES(cls, env: NodeEnvironment) -> dict:
        return {
            "required": {
                "images": ("IMAGE",),
                "filename_prefix": ("STRING", {"default": "ComfyUI"}),
                "codec": (["vp9", "av1"],),
                "fps": ("FLOAT", {"default": 24.0, "min": 0.01, "max": 1000.0, "step": 0.01}),
                "crf": (
                    "FLOAT",
                    {
                        "default": 32.0,
                        "min": 0,
                        "max": 63.0,
                        "step": 1,
                        "tooltip": "Higher crf means lower quality with a smaller file size, "
                        "lower crf means higher quality higher filesize.",
                    },
                ),
            },
            "hidden": dict(_HIDDEN_PROMPT_INPUTS),
        }

    def run(
        self, ctx: NodeRunContext, images: ImageBatch, filename_prefix: str, codec: str, fps: float, crf: float
    ) -> NodeOutput:
        path, result = _next_output_file(ctx, filename_prefix, images.width, images.height, "webm")
        media.save_webm(images, path, codec, fps, crf, ctx.prompt, ctx.extra_pnginfo)
        return NodeOutput(ui={"images": [result], "animated": [True]})


class CreateVideo(SimulatedNode):
    RETURN_TYPES = ("VIDEO",)
    CATEGORY = "image/video"
    DESCRIPTION = "Create a video from images."
    DISPLAY_NAME = "Create Video"
    PYTHON_MODULE = "comfy_extras.nodes_video"

    @classmethod
    def INPUT_TYPES(cls, env: NodeEnvironment) -> dict:
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The images to create a video from."}),
                "fps": ("FLOAT", {"default": 30.0, "min": 1.0, "max": 120.0, "step": 1.0}),
            },
            "optional": {"audio": ("AUDIO", {"tooltip": "The audio to add to the video."})},
        }

    def run(self, ctx: NodeRunContext, images: ImageBatch, fps: float, audio: Any = None) -> NodeOutput:
        # No simulated node outputs AUDIO, so validation already rejected any audio link.
        return NodeOutput((media.VideoFromComponents(images, Fraction(fps)),))


class SaveVideo(SimulatedNode):
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    CATEGORY = "image/video"
    DESCRIPTION = "Saves the input images to your ComfyUI output directory."
    DISPLAY_NAME = "Save Video"
    PYTHON_MODULE = "comfy_extras.nodes_video"

    @classmethod
    def INPUT_TYPES(cls, env: NodeEnvironment) -> dict:
        return {
            "required": {
                "video": ("VIDEO", {"tooltip": "The video to save."}),
                "filename_prefix": ("STRING", {"default": "video/ComfyUI", "tooltip": _FILENAME_PREFIX_TOOLTIP}),
                "format": (["auto", "mp4"], {"default": "auto", "tooltip": "The format to save the video as."}),
                "codec": (["auto", "h264"], {"default": "auto", "tooltip": "The codec to use for the video."}),
            },
            "hidden": dict(_HIDDEN_PROMPT_INPUTS),
        }

    def run(
        self, ctx: NodeRunContext, video: media.VideoFromComponents, filename_prefix: str, format: str, codec: str
    ) -> NodeOutput:
        # Both "auto" choices resolve to MP4/H.264, the only container and codec 0.3.64 offers.
        width, height = video.get_dimensions()
        path, result = _next_output_file(ctx, filename_prefix, width, height, "mp4")
        metadata = dict(ctx.extra_pnginfo or {})
        if ctx.prompt is not None:
            metadata["prompt"] = ctx.prompt
        video.save_to(path, metadata or None)
        return NodeOutput(ui={"images": [result], "animated": [True]})


class SaveImageWebsocket(SimulatedNode):
    """ComfyUI's websocket_image_save example node: images leave only as binary WS frames."""

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    CATEGORY = "api node/image/websocket"
    PYTHON_MODULE = "custom_nodes.websocket_image_save"

    @classmethod
    def INPUT_TYPES(cls, env: NodeEnvironment) -> dict:
        return {"required": {"images": ("IMAGE",)}}

    @classmethod
    def IS_CHANGED(cls, env: NodeEnvironment, **inputs: Any) -> float:
        return time.time()

    def run(self, ctx: NodeRunContext, images: ImageBatch) -> NodeOutput:
        progress = ctx.progress_bar(len(images))
        for step, frame in enumerate(images.frames):
            progress.update_absolute(step, len(images), ("PNG", frame, None))
        return NodeOutput()
