"""ComfyUI's IMAGE and MASK values, held as Pillow frames instead of torch tensors.

ComfyUI passes images between nodes as float tensors shaped (batch, height, width, 3) with values
in 0..1, and masks as (batch, height, width). The simulator keeps the same data as a list of Pillow
frames (RGB for images, L for masks), which is all its nodes need. `str()` of a batch reproduces
torch's printout, because ComfyUI puts `str(tensor)` into an execution_error's `current_inputs`.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Sequence

from PIL import Image

# torch's default print options (torch._tensor_str.PRINT_OPTS)
_PRINT_THRESHOLD = 1000
_PRINT_EDGEITEMS = 3
_PRINT_LINEWIDTH = 80


class ImageBatch:
    """A batch of equally sized frames: mode "RGB" makes it an IMAGE, mode "L" a MASK."""

    def __init__(self, frames: Sequence[Image.Image]):
        if not frames:
            raise ValueError("an image batch needs at least one frame")
        self.frames = list(frames)

    @property
    def is_mask(self) -> bool:
        return self.frames[0].mode == "L"

    @property
    def width(self) -> int:
        return self.frames[0].width

    @property
    def height(self) -> int:
        return self.frames[0].height

    @property
    def shape(self) -> tuple[int, ...]:
        batch, height, width = len(self.frames), self.height, self.width
        return (batch, height, width) if self.is_mask else (batch, height, width, 3)

    def __len__(self) -> int:
        return len(self.frames)

    def value_at(self, index: tuple[int, ...]) -> float:
        """The tensor element at `index`, as ComfyUI would hold it (0..1)."""
        frame = self.frames[index[0]]
        pixel = frame.getpixel((index[2], index[1]))
        if self.is_mask:
            return pixel / 255.0
        return pixel[index[3]] / 255.0

    def __str__(self) -> str:
        return tensor_repr(self.shape, self.value_at)


def tensor_repr(shape: Sequence[int], value_at: Callable[[tuple[int, ...]], float]) -> str:
    """What `str(torch.tensor(...))` prints for a float tensor of `shape`, reading only the
    elements torch shows (edges of each dimension once the tensor has over 1000 elements)."""
    summarize = math.prod(shape) > _PRINT_THRESHOLD

    def shown_indices(size: int) -> list[int | None]:
        # None stands for the "..." torch prints in place of the middle of a long dimension.
        if summarize and size > 2 * _PRINT_EDGEITEMS:
            return [*range(_PRINT_EDGEITEMS), None, *range(size - _PRINT_EDGEITEMS, size)]
        return list(range(size))

    per_dim = [[i for i in shown_indices(size) if i is not None] for size in shape]
    shown_values = [value_at(index) for index in itertools.product(*per_dim)]
    format_value = _value_formatter(shown_values)

    def vector_str(prefix: tuple[int, ...], indent: int) -> str:
        width = len(format_value(shown_values[0]))
        elements_per_line = max(1, math.floor((_PRINT_LINEWIDTH - indent) / (width + 2)))
        data = [" ..." if i is None else format_value(value_at((*prefix, i))) for i in shown_indices(shape[-1])]
        lines = [", ".join(data[i : i + elements_per_line]) for i in range(0, len(data), elements_per_line)]
        return "[" + (",\n" + " " * (indent + 1)).join(lines) + "]"

    def tensor_str(prefix: tuple[int, ...], indent: int) -> str:
        dims_left = len(shape) - len(prefix)
        if dims_left == 1:
            return vector_str(prefix, indent)
        slices = [
            "..." if i is None else tensor_str((*prefix, i), indent + 1)
            for i in shown_indices(shape[len(prefix)])
        ]
        return "[" + ("," + "\n" * (dims_left - 1) + " " * (indent + 1)).join(slices) + "]"

    return "tensor(" + tensor_str((), len("tensor(")) + ")"


def _value_formatter(values: list[float]) -> Callable[[float], str]:
    """torch's _Formatter for the values in 0..1 an image holds: integral tensors print as "1.",
    the rest with 4 decimals, all right-aligned to the widest element."""
    if all(value == math.floor(value) for value in values):
        def render(value: float) -> str:
            return f"{value:.0f}."
    else:
        def render(value: float) -> str:
            return f"{value:.4f}"
    width = max(len(render(value)) for value in values)
    return lambda value: render(value).rjust(width)
