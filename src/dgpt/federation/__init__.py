"""One round of decentralized training as plain computation on tensors: the `Strategy` (who takes part, checking
and combining what arrived, FedExP, the outer optimizer, bytes), the aggregation rules and the payload `Codec`.

Imports torch and `dgpt.config` only: no torch.distributed, no sockets, no files. Every runtime (sim, torchrun,
and a Flower server) drives the same objects.
"""
