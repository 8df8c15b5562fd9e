"""Export of trained encoders to PyTorch-loadable files (timm / Hugging Face names)."""
