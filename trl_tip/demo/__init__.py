"""`trl-tip demo`: the embedded SmolLM2 teacher (fetched from PyPI), its layer-pruned student, generated arithmetic
problems and the demo's own held-out check."""
