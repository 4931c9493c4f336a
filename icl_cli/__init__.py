"""icl: sparse feature circuits for in-context learning (Kharlapenko et al., ICML 2025)."""

__version__ = "0.1.0"
