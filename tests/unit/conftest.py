"""Fixtures shared by the unit tests."""
from __future__ import annotations

import pytest
import torch

from specmesh.actors import hf, tiny
from specmesh.actors.draft import DraftWorker
from specmesh.actors.stage import TargetStage


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    """A noisy tiny draft (it disagrees with the target often) and the tiny target in one stage."""
    cache = tmp_path_factory.mktemp("models")
    target = hf.load_stage(tiny.materialise("tiny", cache), dtype=torch.float32)
    drafted = hf.load_stage(tiny.materialise("tiny-draft:noise=0.6", cache), dtype=torch.float32)
    return DraftWorker(drafted), TargetStage(target)
