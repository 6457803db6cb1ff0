"""One trainer's side of training: the inner loop (optimizer, schedule, clipping, autocast), fine-tuning's task
loop, checkpoints, validation and the metrics log.

Imports data, model and objectives; never federation, runtimes or the interfaces.
"""
