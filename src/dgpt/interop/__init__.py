"""Interoperability with other toolkits: `dgpt.interop.hf` exports a run to, and imports a run from, the
Hugging Face `transformers` directory layout (GPT-1 -> `OpenAIGPTLMHeadModel`, pre-LN -> `GPT2LMHeadModel`).

An interface, like cli, api, plot and demo: it may import any layer, and no layer imports it.
"""
