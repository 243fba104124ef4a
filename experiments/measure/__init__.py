"""What a run records and predicts: metric names and metrics.json (record.py), TensorBoard
(metrics.py), the comm counter and memory probes (counters.py), FLOPs (flops.py), the papers'
formulas (theory.py) and the theory tags beside each measurement (predict.py)."""
