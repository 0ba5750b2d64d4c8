"""The one table of methods: per stage, name -> (config type, function). A recipe stage holds a config; its type
says which method runs. The CLI's choices, the recipe's YAML round-trip and the pipeline all read this table.

Function signatures per stage:
  factorize   (weight (out, in), Statistics, rank, config) -> Factorization
  quantize    layer quantizers: (weight (out, in), gram (in, in) or None, config, cross=None) -> Quantization,
              cross = sum (x_fp - x) x^T where both streams were captured (read by GPTAQ);
              learned quantizers (LearnedConfig): (blocks, linears, inputs, targets, block_kwargs, config)
              -> per block {name: QuantizedWeight}
  compensate  (error (out, in), Statistics, config) -> LowRank
"""
from __future__ import annotations

from typing import Callable

from compress.compensate.eora import EoRA, compensate_eora
from compress.compensate.lorc import LoRC, compensate_lorc
from compress.factorize.eora import EoRAFactorize, factorize_eora
from compress.factorize.lorap import LoRAP, factorize_awsvd
from compress.factorize.saes_svd import SAES, factorize_saes
from compress.factorize.svd import SVD, factorize_svd
from compress.factorize.svd_llm import SVDLLM, factorize_svd_llm
from compress.quantize.cbq import CBQ, quantize_window_cbq
from compress.quantize.gptq import GPTAQ, GPTQ, quantize_gptq
from compress.quantize.lrq import LRQ, quantize_window_lrq
from compress.quantize.rtn import RTN, quantize_rtn
from compress.quantize.signround import SignRound, quantize_window_signround

METHODS: dict[str, dict[str, tuple[type, Callable]]] = {
    "factorize": {
        "svd": (SVD, factorize_svd),
        "svd-llm": (SVDLLM, factorize_svd_llm),
        "saes-svd": (SAES, factorize_saes),
        "eora": (EoRAFactorize, factorize_eora),
        "lorap": (LoRAP, factorize_awsvd),
    },
    "quantize": {
        "rtn": (RTN, quantize_rtn),
        "gptq": (GPTQ, quantize_gptq),
        "gptaq": (GPTAQ, quantize_gptq),
        "lrq": (LRQ, quantize_window_lrq),
        "cbq": (CBQ, quantize_window_cbq),
        "signround": (SignRound, quantize_window_signround),
    },
    "compensate": {
        "lorc": (LoRC, compensate_lorc),
        "eora": (EoRA, compensate_eora),
    },
}
# when only a stage's knobs are given
DEFAULT_METHODS = {"factorize": "svd-llm", "quantize": "rtn", "compensate": "eora"}
_NAMES = {config: (stage, name) for stage, table in METHODS.items() for name, (config, _) in table.items()}


def method_name(config: object) -> str:
    """The table's name of the method a config runs."""
    return _NAMES[type(config)][1]


def run(config: object) -> Callable:
    """The function that runs a config's method."""
    stage, name = _NAMES[type(config)]
    return METHODS[stage][name][1]


def config_type(stage: str, name: str) -> type:
    return METHODS[stage][name][0]
