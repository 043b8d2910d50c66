"""Deployment paths that would freeze one batch's decisions are refused (issue 14, item 11).

``torch.jit.trace`` (and ONNX export by tracing) records the operations one
example batch ran; ``torch.jit.script`` of a ``@per_sample`` forward used to
compile the undecorated per-example source and decide once per batch.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

import adaptnet
from adaptnet.errors import DynamicError
from adaptnet.models import build


def branch_model() -> nn.Module:
    class Routed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 2), nn.Linear(4, 2)

        def forward(self, x):
            return adaptnet.branch(x[:, 0] > 0, self.a, self.b, x)

    return Routed()


def exit_model() -> nn.Module:
    stages = [nn.Linear(4, 4), nn.Linear(4, 4)]
    return adaptnet.EarlyExit(stages, [nn.Linear(4, 3), nn.Linear(4, 3)], threshold=[0.5])


def depth_model() -> nn.Module:
    policy = adaptnet.dynamic.ThresholdHalting(nn.Linear(4, 1), 0.5)
    return adaptnet.AdaptiveDepth(nn.Linear(4, 4), policy, max_steps=3)


MODELS = {"per_sample": lambda: build("branch_net", in_features=4), "branch": branch_model,
          "early_exit": lambda: exit_model().eval(), "adaptive_depth": depth_model}


@pytest.mark.parametrize("name", list(MODELS))
def test_tracing_a_dynamic_model_is_refused(name):
    model, x = MODELS[name](), torch.randn(6, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jit deprecation warnings
        with pytest.raises(DynamicError, match=r"is being traced .* would replay them for "
                           r"every input"):
            torch.jit.trace(model, x)
        with pytest.raises(DynamicError, match="is being traced"):
            torch.onnx.export(model, (x,), io.BytesIO(), dynamo=False)
    model(x)  # eager still works


@pytest.mark.slow
def test_scripting_a_per_sample_model_stops_at_compile_time():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(torch.jit.frontend.NotSupportedError,
                           match="adaptnet: no TorchScript; eager or compile"):
            torch.jit.script(build("branch_net"))

