"""Shared fixtures: one single-process megatron world per test session and tiny random Qwen3.5 models."""

from __future__ import annotations

import pytest

import megatron_ext
from megatron_ext import hf_mapping, parallel


@pytest.fixture(scope="session", autouse=True)
def megatron_world():
    parallel.initialize(tensor_parallel=1, pipeline_parallel=1, seed=1234)
    yield


def megatron_twin(hf_model, **build_kwargs):
    """The megatron model with the HF model's weights, copied through the converters' mapping."""
    config = megatron_ext.Qwen35Config.from_hf(hf_model.config.to_dict())
    model = megatron_ext.build_model(config, backend="local", device="cpu", **build_kwargs)
    state = hf_model.state_dict()
    hf_mapping.copy_hf_into(model, config, state.__getitem__, hf_mapping.lm_prefix(state))
    return model

