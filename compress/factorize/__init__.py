"""Low-rank factorizations W ~= up @ down: one module per method."""
