"""Import a transformers π0 checkpoint (`PI0ForConditionalGeneration`, transformers 5.23) into an edge-vla bundle.

- `checkpoint`: recognise and load a `save_pretrained` directory, its processor statistics and tokenizer
- `graphs`:     torch wrappers that reproduce `sample_actions` as a prefix graph and a denoise-step graph
- `numerics`:   the bundle's chunk vs `sample_actions` with the same noise
- `exporter`:   the whole chain into a schema-2 bundle (docs/MANIFEST.md, docs/PI0.md)
- `sidecar`:    the robot description a checkpoint does not hold (action names, units, limits)
- `testing`:    small π0 checkpoints built offline, for tests and benchmarks
"""
