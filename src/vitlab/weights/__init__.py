"""Weights on disk: vitlab model directories and converters to and from timm, torchvision and
Hugging Face layouts."""
