"""Every strategy trains what one process trains: same seed, same global batch, same losses."""

from __future__ import annotations

import pytest

from tests.helpers import max_rel_dev, train

FP32_REL = 1e-5


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return train(tmp_path_factory.mktemp("single") / "job", "strategy=single", "launcher=local")


@pytest.mark.parametrize("world", [2, 4])
def test_ddp_matches_single_process(tmp_path, reference, world):
    m = train(tmp_path / "job", "strategy=ddp", "launcher=torchrun", f"launcher.nproc_per_node={world}")
    assert m["world_size"] == world
    assert max_rel_dev(m["losses"], reference["losses"]) <= FP32_REL
