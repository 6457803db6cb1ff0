"""Data layer: oracle sources, cleaning, the BPE tokenizer, token shards with manifests, `dgpt prepare`."""
