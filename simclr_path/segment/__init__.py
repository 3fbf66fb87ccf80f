"""Segmentation from the exported encoder: labels, a Unet, supervised and FixMatch training, inference."""
