"""Where the simulated ComfyUI keeps files, and ComfyUI's rules for naming them.

One data dir holds `output/`, `input/` and `temp/`, like a ComfyUI install. The helpers mirror
ComfyUI's `folder_paths` module: `annotated_filepath` ("name [output]"), `get_save_image_path`
(the `<prefix>_<5-digit counter>_` scheme whose counter continues from the highest existing file,
so it survives restarts) and the type -> directory mapping used by /view and /upload/image.
"""

from __future__ import annotations

import mimetypes
import os
import shutil
import time
from pathlib import Path

FOLDER_TYPES = ("output", "input", "temp")


class DataPaths:
    """The three ComfyUI folders under one data dir. All paths are absolute and normalised,
    because ComfyUI's traversal checks compare them with os.path.commonpath."""

    def __init__(self, data_dir: Path):
        root = os.path.abspath(os.fspath(data_dir))
        self.root = root
        self.output_dir = os.path.join(root, "output")
        self.input_dir = os.path.join(root, "input")
        self.temp_dir = os.path.join(root, "temp")

    def prepare(self) -> None:
        """Create the folders; wipe temp/, as ComfyUI does at start-up."""
        os.makedirs(self.output_dir, exist_ok=True)
        os.makedirs(self.input_dir, exist_ok=True)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        os.makedirs(self.temp_dir, exist_ok=True)

    def directory_by_type(self, type_name: str | None) -> str | None:
        return {"output": self.output_dir, "input": self.input_dir, "temp": self.temp_dir}.get(type_name)

    def annotated_filepath(self, name: str) -> tuple[str, str | None]:
        """Split "x.png [output]" into ("x.png", output_dir); an unannotated name gives (name, None)."""
        for type_name in FOLDER_TYPES:
            suffix = f"[{type_name}]"
            if name.endswith(suffix):
                return name[: -(len(suffix) + 1)], self.directory_by_type(type_name)
        return name, None

    def get_annotated_filepath(self, name: str) -> str | None:
        """The file an image input like "sub/x.png" or "x.png [temp]" refers to (input/ by default).
        None when the name points outside its folder: unlike ComfyUI, the simulator never reads
        files outside its data dir, since it may be exposed in demos."""
        name, base_dir = self.annotated_filepath(name)
        base_dir = base_dir or self.input_dir
        path = os.path.abspath(os.path.join(base_dir, name))
        if os.path.commonpath((base_dir, path)) != base_dir:
            return None
        return path

    def exists_annotated_filepath(self, name: str) -> bool:
        path = self.get_annotated_filepath(name)
        return path is not None and os.path.exists(path)

    def list_input_images(self) -> list[str]:
        """Files directly in input/ whose type is an image, sorted: LoadImage's choice list."""
        names = [n for n in os.listdir(self.input_dir) if os.path.isfile(os.path.join(self.input_dir, n))]
        return sorted(n for n in names if (mimetypes.guess_type(n)[0] or "").startswith("image/"))

    def get_save_image_path(
        self, filename_prefix: str, output_dir: str, image_width: int = 0, image_height: int = 0
    ) -> tuple[str, str, int, str, str]:
        """ComfyUI's folder_paths.get_save_image_path: returns
        (full_output_folder, filename, counter, subfolder, filename_prefix).

        The prefix may carry a subfolder ("video/gw_mp4"); the counter is one more than the highest
        `<filename>_<digits>_...` already in that folder, whatever the extension."""
        if "%" in filename_prefix:
            filename_prefix = _compute_vars(filename_prefix, image_width, image_height)

        subfolder = os.path.dirname(os.path.normpath(filename_prefix))
        filename = os.path.basename(os.path.normpath(filename_prefix))
        full_output_folder = os.path.join(output_dir, subfolder)

        if os.path.commonpath((output_dir, os.path.abspath(full_output_folder))) != output_dir:
            raise Exception(
                "**** ERROR: Saving image outside the output folder is not allowed."
                f"\n full_output_folder: {os.path.abspath(full_output_folder)}"
                f"\n         output_dir: {output_dir}"
                f"\n         commonpath: {os.path.commonpath((output_dir, os.path.abspath(full_output_folder)))}"
            )

        prefix_len = len(filename)

        def counter_and_prefix(existing: str) -> tuple[int, str]:
            prefix = existing[: prefix_len + 1]
            try:
                digits = int(existing[prefix_len + 1 :].split("_")[0])
            except ValueError:
                digits = 0
            return digits, prefix

        try:
            matches = [counter_and_prefix(existing) for existing in os.listdir(full_output_folder)]
            counter = max(
                digits
                for digits, prefix in matches
                if os.path.normcase(prefix[:-1]) == os.path.normcase(filename) and prefix[-1:] == "_"
            ) + 1
        except ValueError:
            counter = 1
        except FileNotFoundError:
            os.makedirs(full_output_folder, exist_ok=True)
            counter = 1
        return full_output_folder, filename, counter, subfolder, filename_prefix


def _compute_vars(text: str, image_width: int, image_height: int) -> str:
    now = time.localtime()
    replacements = {
        "%width%": str(image_width),
        "%height%": str(image_height),
        "%year%": str(now.tm_year),
        "%month%": str(now.tm_mon).zfill(2),
        "%day%": str(now.tm_mday).zfill(2),
        "%hour%": str(now.tm_hour).zfill(2),
        "%minute%": str(now.tm_min).zfill(2),
        "%second%": str(now.tm_sec).zfill(2),
    }
    for token, value in replacements.items():
        text = text.replace(token, value)
    return text
