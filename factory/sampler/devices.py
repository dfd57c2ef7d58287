"""torch device names, checked without torch: ``generate --device`` is refused at once, not by
each sampler worker once Ray has started and the model is loading."""

from __future__ import annotations

import re

from factory.errors import InputError

#: The device types torch itself knows (``torch.device`` refuses any other): TYPE or TYPE:INDEX.
TORCH_DEVICE_TYPES = (
    "cpu", "cuda", "mps", "xpu", "hip", "meta", "ipu", "mkldnn", "opengl", "opencl", "ideep", "ve", "fpga",
    "maia", "xla", "lazy", "vulkan", "hpu", "mtia", "privateuseone",
)  # fmt: skip
_DEVICE_RE = re.compile(r"^(?P<type>[a-z]+)(?::(?:0|[1-9][0-9]*))?$")


def check_device_name(device: str, option: str = "--device") -> str:
    """``device`` when torch would take it (``cpu``, ``cuda``, ``cuda:1`` ...); else a one-line
    ``InputError``. Whether the machine has that device is the worker's check, where the model loads."""
    match = _DEVICE_RE.match(device)
    if match is None or match["type"] not in TORCH_DEVICE_TYPES:
        raise InputError(f"{option} {device}: not a torch device (e.g. cpu, cuda, cuda:1, mps)")
    return device
