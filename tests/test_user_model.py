"""A user's own model and dataset, in a package and a config dir outside the repo, found through
hydra.searchpath and PYTHONPATH, as docs/models.md shows: they train under ddp, fsdp and pp to
the losses of one process, and what they do not declare (a TP plan) is refused in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from experiments.report.parity import deviations, tolerance
from tests.helpers import REPO, child_env

NET = '''
from torch import nn

from models.staged import StagedModel


class TinyNet(StagedModel):
    """stem -> `depth` blocks -> head: FSDP shards each block, a pipeline cuts between them."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int, depth: int) -> None:
        super().__init__()
        self.stem = nn.Linear(input_shape[0], width)
        self.blocks = nn.ModuleDict(
            {str(i): nn.Sequential(nn.Linear(width, width), nn.Tanh()) for i in range(depth)}
        )
        self.head = nn.Linear(width, num_classes)
'''
DATA = '''
import torch
from torch.utils.data import Dataset


class Blobs(Dataset):
    """Points around one centre per class; the held-out split is drawn from another seed."""

    def __init__(self, split: str, seed: int, n: int, dim: int, classes: int) -> None:
        g = torch.Generator().manual_seed(seed * 2 + (split == "val"))
        centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(seed))
        self.y = torch.randint(classes, (n,), generator=g)
        self.x = centres[self.y] + 0.5 * torch.randn(n, dim, generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]
'''
MODEL_YAML = "_target_: my_project.net.TinyNet\nwidth: 16\ndepth: 4\n"
DATA_YAML = textwrap.dedent(
    """\
    _target_: my_project.data.Blobs
    name: blobs
    input_shape: [6]
    num_classes: 3
    args: {n: 256, dim: 6, classes: 3}
    """
)
COMMON = [
    "model=tiny_net",
    "dataset=blobs",
    "train.steps=5",
    "train.global_batch_size=16",
    "train.log_every=1",
    "train.eval_every=5",
    "train.eval_samples=32",
]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("user")
    pkg = root / "my_project"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "net.py").write_text(NET)
    (pkg / "data.py").write_text(DATA)
    for group, text in (("model/tiny_net.yaml", MODEL_YAML), ("dataset/blobs.yaml", DATA_YAML)):
        (root / "conf" / group).parent.mkdir(parents=True, exist_ok=True)
        (root / "conf" / group).write_text(text)
    return root


def train(project: Path, job: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = child_env() | {"PYTHONPATH": str(project)}
    cmd = [
        sys.executable,
        str(REPO / "train.py"),
        f"hydra.searchpath=[file://{project / 'conf'}]",
        *COMMON,
        *overrides,
        f"hydra.run.dir={job}",
    ]
    # From the user's directory, not the repo's.
    return subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=300)


def in_process(project: Path, job: Path, *overrides: str) -> list[float]:
    """The same job through the parity harness: this process composes and launches, the ranks
    find the user's package on PYTHONPATH as the CLI's would."""
    from experiments.report.parity import run_case

    conf = f"hydra.searchpath=[file://{project / 'conf'}]"
    return run_case([conf, *COMMON, *overrides], job)["losses"]


@pytest.fixture(scope="module")
def user_path(project):
    """The user's package importable here and in every rank started from here."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(project))
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(project), os.environ.get("PYTHONPATH")])))
        yield


@pytest.fixture(scope="module")
def reference(project, user_path, tmp_path_factory) -> list[float]:
    return in_process(project, tmp_path_factory.mktemp("ref") / "job", "strategy=single", "launcher=local")


def test_a_users_model_and_dataset_train_from_their_directory_as_one_process_does(
    project, reference, tmp_path
):
    """The CLI, run from the user's directory with their package on PYTHONPATH."""
    proc = train(project, tmp_path / "job", "strategy=ddp", "launcher.nproc_per_node=2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads((tmp_path / "job" / "metrics.json").read_text())["losses"]
    assert len(got) == 5
    assert max(deviations(got, reference)) <= tolerance("fp32"), (got, reference)


@pytest.mark.parametrize("strategy", ["fsdp", "pp"])
def test_a_users_model_shards_and_pipelines_as_one_process_trains(project, reference, strategy, tmp_path):
    got = in_process(project, tmp_path / "job", f"strategy={strategy}", "launcher.nproc_per_node=2")
    assert len(got) == 5
    worst = max(deviations(got, reference))
    assert worst <= tolerance("fp32"), (strategy, got, reference)


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("strategy=tp", "strategy=tp needs a TP plan; model=tinynet declares none"),
        ("model.widht=8", "model.widht"),
        ("model._target_=my_project.nowhere.Net", "does not import"),
        ("model.width=-1", "model=tinynet: my_project.net.TinyNet(...) raised RuntimeError"),
        ("model.width=wide", "model.width='wide' must be int"),
        ("dataset.input_shape=[5]", "dataset.input_shape=[6]"),
        ("dataset.num_classes=2", "dataset.num_classes=2"),
        ("dataset.args.n=8", "fewer than one batch"),
    ],
)
def test_a_users_bad_config_is_one_line_naming_the_key(
    project, monkeypatch, capfd, tmp_path, override, names
):
    """In this process, as test_hostile runs the CLI: one line, exit 2, no job dir, no process."""
    from tests.test_hostile import rejected

    monkeypatch.syspath_prepend(str(project))
    plus = "+" if override.startswith("model.widht") else ""
    conf = f"hydra.searchpath=[file://{project / 'conf'}]"
    line = rejected(monkeypatch, capfd, tmp_path, conf, *COMMON, f"{plus}{override}")
    assert names in line, line
