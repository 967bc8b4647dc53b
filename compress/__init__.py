"""compress: turn pretrained ViT/ResNet checkpoints into smaller, faster models, verified."""
from .core import offline  # noqa: F401 - before anything imports onnxruntime: no telemetry, no network
from .core.version import __version__  # noqa: F401
