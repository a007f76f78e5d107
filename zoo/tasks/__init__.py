"""LightningModules: the training logic of each model family."""
