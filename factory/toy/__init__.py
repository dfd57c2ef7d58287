"""The toy world and the toy model: procedural objects on green and a small DiffuMatting model
trained on them (see ``docs/toy-model.md``)."""
