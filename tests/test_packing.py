"""Documents packed in one row are independent, for both layer types; padding does not leak either.
In float64 (``conftest.float64``), so "independent" is checked to 1e-10, far below any real leak."""

from __future__ import annotations

import pytest
import torch
from conftest import float64, megatron_twin

from tools.tiny_qwen35 import causal_lm, text_config

L, F = "linear_attention", "full_attention"
TOL = dict(atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("pattern", [[L, F, L, F], [L, L], [F, F]], ids=["hybrid", "gdn_only", "attention_only"])
def test_packed_documents_equal_documents_alone(pattern):
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 96, (1, 37), generator=gen), torch.randint(0, 96, (1, 70), generator=gen)
    packed_ids = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(37), torch.arange(70)]).unsqueeze(0)  # reset = new document
    with float64(), torch.no_grad():
        model = megatron_twin(causal_lm(text_config(layer_types=pattern), seed=2)).eval()
        packed = model(packed_ids, positions)
        alone_a, alone_b = model(a), model(b)
        leaky = model(packed_ids, torch.arange(107).unsqueeze(0))  # same tokens, one long document
    assert packed.dtype == torch.float64
    torch.testing.assert_close(packed[:, :37], alone_a, **TOL)
    torch.testing.assert_close(packed[:, 37:], alone_b, **TOL)
    assert (leaky[:, 37:] - alone_b).abs().max() > 1e-3  # without the boundary, document 1 leaks into 2


def test_rows_of_a_batch_and_left_padding_are_independent():
    gen = torch.Generator().manual_seed(1)
    short, long = torch.randint(1, 96, (1, 20), generator=gen), torch.randint(1, 96, (1, 33), generator=gen)
    batch = torch.cat([torch.cat([torch.zeros(1, 13, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :13] = 0
    with float64(), torch.no_grad():
        model = megatron_twin(causal_lm(text_config(), seed=3)).eval()
        out = model(batch, attention_mask=mask)
        torch.testing.assert_close(out[0, 13:], model(short)[0], **TOL)
        torch.testing.assert_close(out[1], model(long)[0], **TOL)
