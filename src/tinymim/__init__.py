"""tinymim: pre-train small Vision Transformers by distilling the token relations of a masked-image-
modeling teacher (TinyMIM, CVPR 2023), then fine-tune and evaluate them."""

__version__ = "0.1.0"
