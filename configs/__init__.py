"""Pretraining presets (YAML), installed as ``simclr_path.configs``: ``--config NAME`` reads NAME.yaml here."""
