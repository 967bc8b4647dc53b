"""compress: turn pretrained ViT/ResNet checkpoints into smaller, faster models, verified."""
from .core.version import __version__  # noqa: F401
