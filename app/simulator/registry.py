"""The node classes the simulated server knows, and their /object_info descriptions."""

from __future__ import annotations

from typing import Any

from . import nodes, test_nodes
from .node_types import NodeEnvironment, SimulatedNode

NODE_CLASS_MAPPINGS: dict[str, type[SimulatedNode]] = {
    "EmptyImage": nodes.EmptyImage,
    "SaveImage": nodes.SaveImage,
    "PreviewImage": nodes.PreviewImage,
    "LoadImage": nodes.LoadImage,
    "ImageInvert": nodes.ImageInvert,
    "ImageAddNoise": nodes.ImageAddNoise,
    "SaveAnimatedWEBP": nodes.SaveAnimatedWEBP,
    "SaveAnimatedPNG": nodes.SaveAnimatedPNG,
    "SaveWEBM": nodes.SaveWEBM,
    "CreateVideo": nodes.CreateVideo,
    "SaveVideo": nodes.SaveVideo,
    "SaveImageWebsocket": nodes.SaveImageWebsocket,
    "TestSleepProgress": test_nodes.TestSleepProgress,
    "TestFail": test_nodes.TestFail,
    "TestFlaky": test_nodes.TestFlaky,
}


def node_info(class_type: str, env: NodeEnvironment) -> dict[str, Any]:
    """One /object_info entry, with the keys (and key order) of the recorded server's answer."""
    node_class = NODE_CLASS_MAPPINGS[class_type]
    input_types = node_class.INPUT_TYPES(env)
    return {
        "input": input_types,
        "input_order": {category: list(inputs) for category, inputs in input_types.items()},
        "output": list(node_class.RETURN_TYPES),
        "output_is_list": [False] * len(node_class.RETURN_TYPES),
        "output_name": list(node_class.RETURN_NAMES or node_class.RETURN_TYPES),
        "name": class_type,
        "display_name": node_class.DISPLAY_NAME or class_type,
        "description": node_class.DESCRIPTION,
        "python_module": node_class.PYTHON_MODULE,
        "category": node_class.CATEGORY,
        "output_node": node_class.OUTPUT_NODE,
    }
