"""Model sources: the bundled reference ViT and any timm ViT/DeiT."""
