"""What ComfyUI's `GET /system_stats` says of its devices' memory (shared/comfyui/PROTOCOL.md): each device's
`vram_total` and `vram_free`, in bytes. A CPU-only ComfyUI (and the simulator) lists its RAM as a `cpu` device."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DeviceMemory:
    name: str  # as ComfyUI names it, e.g. "cuda:0 NVIDIA GeForce RTX 4090 : cudaMallocAsync"
    total_bytes: int
    free_bytes: int

    @property
    def used_bytes(self) -> int:
        return max(self.total_bytes - self.free_bytes, 0)


def device_memory(stats: Any) -> list[DeviceMemory]:
    """Each device whose entry has a name and both amounts; an entry of another shape is left out, not guessed."""
    devices = stats.get("devices") if isinstance(stats, dict) else None
    found = []
    for device in devices if isinstance(devices, list) else []:
        if not isinstance(device, dict):
            continue
        name, total, free = device.get("name"), device.get("vram_total"), device.get("vram_free")
        if isinstance(name, str) and _amount(total) and _amount(free):
            found.append(DeviceMemory(name=name, total_bytes=total, free_bytes=free))
    return found


def _amount(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
