"""The three model-free gateway test nodes (/work/shared/comfyui/test_nodes/gateway_test_nodes).

Same inputs, messages and failure modes as the custom nodes installed on the recorded server.
Their exceptions carry the source frame the real node's traceback ends with, so execution_error
tracebacks read like the recorded ones. All three are never cached (IS_CHANGED = NaN).
"""

from __future__ import annotations

import math
from typing import Any

from .images import ImageBatch
from .node_types import NodeEnvironment, NodeOutput, NodeRunContext, SimulatedNode

_SOURCE_FILE = "ComfyUI/custom_nodes/gateway_test_nodes/__init__.py"
OOM_MESSAGE = "CUDA out of memory. Tried to allocate 2.00 GiB"


class OutOfMemoryError(RuntimeError):
    """Stands in for torch.OutOfMemoryError: ComfyUI reports an exception by its module-qualified
    class name and appends its OOM tips for this class."""


OutOfMemoryError.__module__ = "torch"


def _with_source_frame(exc: Exception, line: int, code: str) -> Exception:
    exc.comfy_source_frame = f'  File "{_SOURCE_FILE}", line {line}, in run\n    {code}\n'
    return exc


class _NeverCachedTestNode(SimulatedNode):
    RETURN_TYPES = ("IMAGE",)
    CATEGORY = "testing/gateway"
    PYTHON_MODULE = "custom_nodes.gateway_test_nodes"

    @classmethod
    def IS_CHANGED(cls, env: NodeEnvironment, **inputs: Any) -> float:
        return math.nan


class TestSleepProgress(_NeverCachedTestNode):
    DESCRIPTION = "Sleeps `seconds` in `steps` slices, reporting progress; honours POST /interrupt."
    DISPLAY_NAME = "Test Sleep (progress)"

    @classmethod
    def INPUT_TYPES(cls, env: NodeEnvironment) -> dict:
        return {
            "required": {
                "image": ("IMAGE",),
                "seconds": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 3600.0, "step": 0.1}),
                "steps": ("INT", {"default": 10, "min": 1, "max": 10000}),
            }
        }

    def run(self, ctx: NodeRunContext, image: ImageBatch, seconds: float, steps: int) -> NodeOutput:
        steps = max(1, int(steps))
        progress = ctx.progress_bar(steps)
        per_step = float(seconds) * ctx.env.time_scale / steps
        for _ in range(steps):
            ctx.check_interrupted()
            ctx.sleep(per_step)
            progress.update(1)
        return NodeOutput((image,))


class TestFail(_NeverCachedTestNode):
    DESCRIPTION = "Always raises RuntimeError('CUDA out of memory...') to mimic an OOM."
    DISPLAY_NAME = "Test Fail (fake OOM)"

    @classmethod
    def INPUT_TYPES(cls, env: NodeEnvironment) -> dict:
        return {
            "required": {"image": ("IMAGE",)},
            "optional": {"mode": (["runtime_error", "torch_oom"], {"default": "runtime_error"})},
        }

    def run(self, ctx: NodeRunContext, image: ImageBatch, mode: str = "runtime_error") -> NodeOutput:
        if mode == "torch_oom":
            raise _with_source_frame(OutOfMemoryError(OOM_MESSAGE), 84, "raise torch.OutOfMemoryError(msg)")
        raise _with_source_frame(RuntimeError(OOM_MESSAGE), 85, "raise RuntimeError(msg)")


class TestFlaky(_NeverCachedTestNode):
    DESCRIPTION = "Fails the first `fail_times` calls (per server process, per `key`), then passes the image through."
    DISPLAY_NAME = "Test Flaky"

    @classmethod
    def INPUT_TYPES(cls, env: NodeEnvironment) -> dict:
        return {
            "required": {
                "image": ("IMAGE",),
                "fail_times": ("INT", {"default": 1, "min": 0, "max": 1000}),
            },
            "optional": {"key": ("STRING", {"default": "default"})},
        }

    def run(self, ctx: NodeRunContext, image: ImageBatch, fail_times: int, key: str = "default") -> NodeOutput:
        calls = ctx.env.flaky_calls.get(key, 0) + 1
        ctx.env.flaky_calls[key] = calls
        if calls <= fail_times:
            raise _with_source_frame(
                RuntimeError(f"TestFlaky[{key}]: transient failure {calls}/{fail_times}"),
                118,
                'raise RuntimeError(f"TestFlaky[{key}]: transient failure {n}/{fail_times}")',
            )
        return NodeOutput((image,))
