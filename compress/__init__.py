"""Post-training compression of LLMs: W ~= base + up @ down, one block at a time."""
from compress.compensate.eora import EoRA
from compress.compensate.lorc import LoRC
from compress.errors import CompressError
from compress.factorize.eora import EoRAFactorize
from compress.factorize.lorap import LoRAP
from compress.factorize.saes_svd import SAES
from compress.factorize.svd import SVD
from compress.factorize.svd_llm import SVDLLM
from compress.layer import CompressedLinear
from compress.formats.native import load_compressed, save_compressed
from compress.methods import METHODS
from compress.pipeline import Compressed, compress_model
from compress.quantize.cbq import CBQ
from compress.quantize.gptq import GPTAQ, GPTQ
from compress.quantize.lrq import LRQ
from compress.quantize.rtn import RTN
from compress.quantize.signround import SignRound
from compress.recipe import Calibration, Recipe

__all__ = ["CBQ", "GPTAQ", "GPTQ", "LRQ", "METHODS", "RTN", "SAES", "SVD", "SVDLLM", "Calibration", "Compressed",
           "CompressError", "CompressedLinear", "EoRA", "EoRAFactorize", "LoRAP", "LoRC", "Recipe", "SignRound",
           "compress_model", "load_compressed", "save_compressed"]
