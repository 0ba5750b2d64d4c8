"""Weight quantizers: one module per method, each returning a kernels.grid.QuantizedWeight."""
