"""The toy world and the toy model: procedural objects on green and a small DiffuMatting model
trained on them (see ``docs/toy-model.md``)."""

from pathlib import Path

#: The packaged toy model (a DiffuMatting checkpoint folder): what ``--model toy`` loads.
MODEL_DIR = Path(__file__).resolve().parent / "model"
#: Bump when the packaged toy model is retrained: it is part of its identity.
TOY_VERSION = 2
#: Native image size (px) of the toy model (and of models fine-tuned from it).
TOY_SAMPLE_SIZE = 64
TOY_NOTE = "toy: a demonstration model of a procedural world (docs/toy-model.md); its images are not photographic"
