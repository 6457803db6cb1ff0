"""One round of decentralized training as plain computation on tensors.

Pseudo-gradients in, new global parameters out: aggregation rules, the outer optimizer, compression
and byte accounting. Nothing here knows about processes, sockets or files, so every runtime (sim,
torchrun, and later Flower) calls the same code.
"""
