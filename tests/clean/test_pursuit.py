"""Gradient pursuit where the answer is known."""

import itertools

import numpy as np
import torch

from icl_cli.clean.pursuit import gradient_pursuit


def test_orthonormal_atoms_recover_a_sparse_nonnegative_signal_exactly():
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(40, 40, generator=gen, dtype=torch.float64))
    atoms = q.T  # 40 orthonormal rows
    w_true = torch.zeros(40, dtype=torch.float64)
    idx = torch.tensor([3, 17, 29, 8, 35])
    w_true[idx] = torch.tensor([2.0, 1.5, 0.7, 3.1, 0.2], dtype=torch.float64)
    w = gradient_pursuit(w_true @ atoms, atoms, k=5)
    torch.testing.assert_close(w, w_true, atol=1e-10, rtol=0)


def _nnls_error(atoms: np.ndarray, x: np.ndarray, subset) -> float:
    """Residual norm of the best nonnegative fit of x on a subset of atoms."""
    from scipy.optimize import nnls

    _, res = nnls(atoms[list(subset)].T, x)
    return res


def test_error_close_to_the_best_k_subset_on_a_small_random_dictionary():
    rng = np.random.default_rng(0)
    ratios = []
    for trial in range(20):
        atoms = rng.normal(size=(12, 8))
        atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
        w0 = np.zeros(12)
        w0[rng.choice(12, 3, replace=False)] = rng.uniform(0.5, 2, 3)
        x = w0 @ atoms + 0.05 * rng.normal(size=8)
        w = gradient_pursuit(torch.from_numpy(x), torch.from_numpy(atoms), k=3).numpy()
        assert (w >= 0).all() and (w > 0).sum() <= 3
        err = np.linalg.norm(x - w @ atoms)
        errs = sorted(_nnls_error(atoms, x, s) for s in itertools.combinations(range(12), 3))
        assert err >= errs[0] - 1e-9  # nothing beats the brute-force optimum
        assert err < 0.5 * np.linalg.norm(x)
        ratios.append(sum(e < err for e in errs) / len(errs))
    # k rounds of pursuit find one of the best few k-subsets (their weights are not fully refitted)
    assert np.median(ratios) < 0.05
