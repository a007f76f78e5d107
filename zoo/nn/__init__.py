"""Plain nn.Modules: no Lightning, no Hydra, usable in any training loop."""
