"""One module per strategy: apply_x(model, mesh, ctx) -> Parallelized (parallel/base.py)."""
