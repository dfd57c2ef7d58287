"""Manifest scheduler names -> diffusers schedulers, built from a model's own noise schedule."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from factory.errors import InputError

#: name -> (diffusers class name, overrides). ``dpmpp`` is the default: DPM-Solver++ (2M).
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "dpmpp": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def make_scheduler(name: str, base_config: Mapping[str, Any]) -> Any:
    """A fresh scheduler ``name`` with the model's training noise schedule (betas, timesteps, ...).

    ``base_config`` is the model's own scheduler config (whatever class it was saved with); keys
    the new class does not know are ignored by diffusers' ``from_config``.
    """
    import diffusers

    if name not in SCHEDULERS:
        raise InputError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    cls_name, overrides = SCHEDULERS[name]
    cls = getattr(diffusers, cls_name)
    config = {k: v for k, v in dict(base_config).items() if not k.startswith("_")}
    return cls.from_config(config, **overrides)
