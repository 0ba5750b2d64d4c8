"""Calibration: text sources, token windows, the decoder blocks of a model, and activation statistics."""
from calibration.blocks import block_linears, find_blocks
from calibration.capture import (
                                 GramAccumulator,
                                 Replays,
                                 Statistics,
                                 capture_block_inputs,
                                 group_statistics,
                                 record_grams,
                                 run_block,
                                 swapped,
)
from calibration.data import load_text, sample_windows

__all__ = ["GramAccumulator", "Replays", "Statistics", "block_linears", "capture_block_inputs", "find_blocks",
           "group_statistics", "load_text", "record_grams", "run_block", "sample_windows", "swapped"]
