"""What reads runs and sweeps: compare.py (the report), parity.py (against one process), bench.py
(paralab's loop against hand-written ones), gpu_check.py (the CUDA path)."""
