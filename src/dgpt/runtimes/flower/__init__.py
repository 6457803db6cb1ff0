"""The flower runtime: oracles of different organisations on Flower's deployment engine.

`app` writes the Flower App that `flwr run` ships, `server` is the ServerApp (the Strategy and the ledger),
`client` the ClientApp (one oracle on its own SuperNode), `wire` what travels in their messages. Importing
this package does not import Flower; `server` and `client` do.
"""
