"""The strategy advisor's model: what a configuration will cost on a cluster, before it runs.

profile.py   one meta-device forward and backward, op by op, by part of the model
cluster.py   a cluster's devices and links, from `make calibrate` or published peaks
sizes.py     what each rank of a configuration holds (the Settings parallel/costs.py reads)
timing.py    the step-time split: compute, exposed communication per axis, bubble
predict.py   one configuration's memory and time; space.py every configuration that can run
"""

from __future__ import annotations

from typing import Any

from data.spec import DataSpec
from experiments.config.schema import Config
from parallel.mesh import Degrees


def predict_job(cfg: Config, degrees: Degrees, data: DataSpec) -> dict[str, Any]:
    """The advisor's prediction for a job's own config on the job's cluster (metrics.json's `plan`;
    `make plan ARGS="check=<sweep>"` makes it again for each job of a finished sweep)."""
    from experiments.plan.cluster import machine
    from experiments.plan.predict import predict_config
    from experiments.plan.profile import profile_of

    m = machine(cfg.cluster)
    prediction = predict_config(cfg, degrees, profile_of(cfg.model, data), data, m, [])
    return {"cluster": m.describe(), "calibrated": m.calibrated, **prediction.as_record()}
