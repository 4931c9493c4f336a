"""The word-wise selection of active entries (sparse_train._nonzero) against torch's nonzero."""

from __future__ import annotations

import pytest
import torch

from icl_cli.dictionaries.sparse_train import Pattern, _nonzero


@pytest.mark.parametrize("shape", [(7, 64), (33, 4096), (5, 12), (3, 8)])
@pytest.mark.parametrize("density", [0.0, 0.004, 0.3, 1.0])
def test_nonzero_equals_torch(shape, density):
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(shape, generator=g) < density
    mask[0, -1] = density > 0  # the last byte of a word
    row, col = _nonzero(mask)
    want = mask.nonzero()
    assert torch.equal(row, want[:, 0]) and torch.equal(col, want[:, 1])
    p = Pattern.of(mask)  # CSR pointers follow from the rows
    assert torch.equal(p.crow[1:] - p.crow[:-1], mask.sum(1))


def test_nonzero_of_a_strided_mask():
    mask = torch.rand(64, 16, generator=torch.Generator().manual_seed(1)) < 0.2
    t = mask.T  # not contiguous
    row, col = _nonzero(t)
    want = t.nonzero()
    assert torch.equal(row, want[:, 0]) and torch.equal(col, want[:, 1])
