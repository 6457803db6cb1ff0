"""Runtimes: where the trainers run and how tensors move between them (central, sim, torchrun).

The round driver, its transports, the contribution ledger's writer and the code that reads and writes a run
directory (through RunDir). Imports data, model, train and federation; never the interfaces (cli, api, plot,
audit, interop, demo).
"""
