"""Stage 4, the training engine: config and presets, the loop, gradient computation, checkpoints.

``config`` holds :class:`PretrainConfig` and the presets; ``pretrain`` the loop
(``train_one_epoch``, ``evaluate``, ``pretrain``); ``gradients`` the plain step and the gradient
cache; ``state`` and ``checkpoint`` what a run saves and restores; ``metrics`` and ``curves`` what it
reports; ``knn`` and ``features`` the kNN check and running an encoder over images; ``launch`` how
a run starts (one process, N local processes, or one rank of torchrun/srun).
"""
