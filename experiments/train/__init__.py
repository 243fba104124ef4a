"""One rank's run: setup() builds it, loop.train() runs it (read these two first), step.py is one
optimizer step, meter.py decides what to measure and when, checkpoint.py and state.py are what a
resumed run restores, evaluate.py the held-out pass."""
