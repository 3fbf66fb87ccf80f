"""Stage 5, downstream: the exported encoder and what it is used for.

``encoder`` exports a run's backbone with its metadata and loads it back (timm, features_only);
``embed`` writes features of every stored patch; ``evaluate`` scores an encoder with kNN and a
linear probe; ``segmentation`` loads the encoder into a segmentation network.
"""
