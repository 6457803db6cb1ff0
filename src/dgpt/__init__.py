"""dgpt: decentralized GPT pre-training (DUPT) and fine-tuning (DSFT) across data owners ("oracles").

Layers, each importing only those before it: data -> model -> objectives -> train (local training) ->
federation (pure tensors: no torch.distributed, no files) -> runtimes (round driver, transports, RunDir
users) -> interfaces (cli, api, plot, interop, demo). errors, fileio, config and rundir serve every layer.
Importing dgpt configures nothing, logging included: only the command line does.
"""
