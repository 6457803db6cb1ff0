"""One round of decentralized training as plain computation on tensors: the `Strategy` (who takes part, checking
and combining what arrived, FedExP, the outer optimizer, bytes), the aggregation rules, the payload `Codec`, and the
contribution ledger's arithmetic (Shapley values, records and their hash chain).

Imports torch, `dgpt.config` and `dgpt.errors` only: no torch.distributed, no sockets, no files. Every runtime
(sim, torchrun, and a Flower server) drives the same objects.
"""
