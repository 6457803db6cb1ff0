"""The decoder and its heads: plain torch modules.

Imports nothing of dgpt but itself: no data, training, files or processes."""

from dgpt.model.gpt import GPT, PRESETS, Decoder, GPTConfig, KVCache, resolve_config

__all__ = ["GPT", "PRESETS", "Decoder", "GPTConfig", "KVCache", "resolve_config"]
