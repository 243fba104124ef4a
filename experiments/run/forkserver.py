"""Imported by the fork server alone (launch.FORKSERVER_PRELOAD): it ignores SIGTERM (and USR2).

SLURM, Kubernetes, systemd and a terminal's job control signal the whole process group, and the
fork server is in it. Killed, it takes with it the pipes through which the launcher learns each
rank's exit status: the launcher then reports every rank gone while the ranks are still stopping
at their next log step, and nothing is saved at the stop. So it ignores SIGTERM, as
multiprocessing already has it ignore SIGINT; it still exits when the launcher does (its pipe
closes). The ranks it forks inherit the disposition until worker.main installs their own
handler (experiments/train/signals.py), first thing after reading the config.
"""

from __future__ import annotations

import signal

signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # SLURM's time-limit warning, sent to every task
