"""``factory composite``: generated objects pasted into scenes, with labels that stay exact.

Modules in the order the data flows: ``shards`` (reading tar members), ``objects`` and
``backgrounds`` (the sources), ``placement`` (drawn from (seed, key, k)), ``blend``, ``harmonize``
and ``shadow`` (pixels), ``recipe`` (every number of a composite), ``render`` (a recipe into
pixels), ``generative`` (ring repainting), ``coco``, ``layouts`` (the files of each layout),
``part`` (a committed part of the work), ``card``, ``options`` and ``run`` (the command).
"""

from factory.composite.options import CompositeOptions, parse_range
from factory.composite.run import CompositeSummary, run_composite

__all__ = ["CompositeOptions", "CompositeSummary", "parse_range", "run_composite"]
