"""sinklora: cheap long-context extension (SinkLoRA) and efficient long-context serving.

Nothing heavy happens at import: subpackages are imported on use.
"""

__version__ = "0.1.0"
