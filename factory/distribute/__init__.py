"""Fan-out of `factory generate` on Ray: sampler actors (one per GPU) and CPU finishing tasks.

See docs/distribute.md. ``RayExecutor`` implements ``factory.generate.Executor``.
"""

from factory.distribute.executor import RayExecutor

__all__ = ["RayExecutor"]
