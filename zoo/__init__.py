"""A PyTorch model zoo with config-driven training.

Importing the package is cheap on purpose: torch and Lightning load only when a run needs them.
"""

from omegaconf import OmegaConf

__version__ = "0.1.0"


def _prepared(path: str, key: str) -> object:
    from zoo.data.prepare import prepared_value

    return prepared_value(path, key)


# configs/data/streaming.yaml takes input_shape and num_classes from the prepared data's zoo.json
if not OmegaConf.has_resolver("zoo_prepared"):
    OmegaConf.register_new_resolver("zoo_prepared", _prepared)
