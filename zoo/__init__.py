"""A PyTorch model zoo with config-driven training.

Importing the package is cheap on purpose: torch and Lightning load only when a run needs them.
"""

__version__ = "0.1.0"
