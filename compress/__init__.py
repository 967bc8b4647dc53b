"""compress: turn pretrained ViT/ResNet checkpoints into smaller, faster models, verified."""
__version__ = "0.1.0"
