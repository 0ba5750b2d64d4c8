"""Calibration: text sources, token windows, the decoder blocks of a model, and activation statistics."""
from calibration.blocks import block_linears, find_blocks
from calibration.capture import GramAccumulator, capture_block_inputs, paired_statistics, record_grams, run_block
from calibration.data import load_text, sample_windows

__all__ = ["GramAccumulator", "block_linears", "capture_block_inputs", "find_blocks", "load_text", "paired_statistics", "record_grams",
           "run_block", "sample_windows"]
