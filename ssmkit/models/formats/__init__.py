"""Checkpoint formats: ssmkit's own folder (:mod:`.native`) and transformers' mamba, falcon_mamba, mamba2
(:mod:`.transformers_mamba`) and jamba (:mod:`.jamba`) folders, dispatched by :mod:`.transformers`.
Each converts between its files and ``(ModelConfig, state dict with LanguageModel names)``."""
