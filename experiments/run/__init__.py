"""One job, from a composed config to finished ranks: job.py (read first) validates
(validate.py, keys.py, resources.py), prepares the job dir (jobdir.py), launches (launch.py,
rendezvous.py, nodes.py, slurm.py), and worker.py is what each rank runs."""
