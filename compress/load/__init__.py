"""Load: checkpoints and data -> (model, adapter). Never executes pickled code."""
