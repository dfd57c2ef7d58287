"""GreenPost matting: an image on a green canvas to alpha and decontaminated foreground.

The pipeline is in ``pipeline.py`` (named so the ``greenpost`` function does not shadow a module);
its parts: ``canvas`` (key colour, board plate), ``key``, ``trimap``, ``refine``, ``foreground``,
``fill``; ``folder`` runs it over a folder of images.
"""

from factory.matte.pipeline import GreenPostSettings, MatteResult, greenpost

__all__ = ["GreenPostSettings", "MatteResult", "greenpost"]
