"""Stage 3, data: augmented views of stored patches and the loaders that feed the training loop.

``views`` holds :class:`ViewConfig` and the albumentations pipeline of one view (``--augment cpu``,
the reference); ``device_views`` the batched pipeline that makes both views of a whole batch on the
training device (``--augment device``); ``datasets`` the two-view and decoded-patch datasets;
``loader`` the resumable sampler and DataLoader; ``normalize`` the on-device standardisation shared
by pretraining and inference.
"""
