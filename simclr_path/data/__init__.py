"""Stage 3, data: augmented views of stored patches and the loaders that feed the training loop.

``views`` holds :class:`ViewConfig` and the albumentations pipeline of one view; ``datasets`` the
two-view dataset; ``loader`` the resumable sampler and DataLoader; ``normalize`` the on-device
standardisation shared by pretraining and inference.
"""
