"""What the tests and `scripts/arch_matrix.py` build: tiny models of the architectures users bring (`arch`)."""
