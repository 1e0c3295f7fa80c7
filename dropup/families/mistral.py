"""Mistral (model_type `mistral`) -> Mixtral: a Llama whose attention may slide (v0.1: a 4096-token window on every
layer; later versions: none), with a head width of its own where `head_dim` says so. Its MoE family is Mixtral, so
the expert names are the Llama adapter's."""

from __future__ import annotations

from dropup.config import ConfigError, ModelConfig
from dropup.families.llama import Llama


class Mistral(Llama):
    dense_type = "mistral"
    dense_window_rule = "all"  # MistralConfig.sliding_window (default 4096) on every layer; layer_types ignored

    def dense_window(self, model: ModelConfig) -> dict:
        if model.sliding_window is not None and model.sliding_window_from_layer != 0:
            raise ConfigError("model family mistral slides on every layer or none: sliding_window_from_layer must be 0")
        return {"sliding_window": model.sliding_window}


FAMILY = Mistral()
