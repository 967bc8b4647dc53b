"""The package version, in one place (the report and safetensors metadata carry it)."""
__version__ = "0.1.0"
