"""The machinery around one experiment, in layers; each imports only the ones listed before it.

- config/   the config schema, each key's range, Hydra's compose errors in one line (imports nothing of ours)
- (data/, models/, parallel/ sit between config and measure: what is trained, and how it is split)
- measure/  what a run records: metric names and metrics.json, TensorBoard, counters, FLOPs, predictions
- train/    one rank's run: setup, the step, the loop, its state, checkpoints, evaluation, the Meter
- run/      one job: validate before launch, the job dir, launchers, rendezvous, the ranks' worker, SLURM
- report/   what reads finished runs: compare, parity, bench, gpu-check

tests/test_layers.py holds this order against the code's imports.
"""
