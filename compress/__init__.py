"""Post-training compression of LLMs: W ~= base + up @ down, one block at a time."""
from compress.errors import CompressError
from compress.layer import CompressedLinear
from compress.formats.native import load_compressed, save_compressed
from compress.pipeline import Compressed, compress_model
from compress.recipe import Calibration, Compensate, Factorize, Quantize, Recipe

__all__ = ["Calibration", "Compensate", "Compressed", "CompressError", "CompressedLinear", "Factorize", "Quantize", "Recipe",
           "compress_model", "load_compressed", "save_compressed"]
