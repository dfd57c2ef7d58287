"""factory: a synthetic image-matting dataset factory (DiffuMatting on diffusers).

Stages, one module or subpackage each, in data-flow order:
manifest -> plan -> sampler -> matte -> score -> store -> distribute -> filter -> export; train.
"""

__version__ = "0.1.0"
