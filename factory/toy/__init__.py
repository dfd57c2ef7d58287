"""The toy world and the toy model: procedural objects on green and a small DiffuMatting model
trained on them (see ``docs/toy-model.md``)."""

from pathlib import Path

#: The packaged toy model (a DiffuMatting checkpoint folder): what ``--model toy`` loads.
MODEL_DIR = Path(__file__).resolve().parent / "model"
