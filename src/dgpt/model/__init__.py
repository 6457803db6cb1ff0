"""The decoder and its heads."""

from dgpt.model.gpt import GPT, PRESETS, Decoder, GPTConfig, KVCache, resolve_config

__all__ = ["GPT", "PRESETS", "Decoder", "GPTConfig", "KVCache", "resolve_config"]
