"""Data layer: oracle sources, cleaning, the BPE tokenizer, token shards with manifests, `dgpt prepare`.

The bottom layer: it imports no other dgpt package (only errors, fileio, config and rundir).
"""
