"""One training run: the config, the train loop (trainer.py), the engines (DDP, DeepSpeed), objectives,
checkpoints, the metrics log, the result record, stop signals and provenance; and packed runs (packed.py),
several runs trained as one batched model through the same records. Imports core, recipe, models, data_pipelines."""
