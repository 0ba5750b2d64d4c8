import pytest

from compress.errors import CompressError
from compress.factorize.saes_svd import SAES
from compress.factorize.svd import SVD
from compress.factorize.svd_llm import SVDLLM
from compress.methods import METHODS, method_name
from compress.quantize.cbq import CBQ
from compress.quantize.gptq import GPTQ
from compress.quantize.rtn import RTN
from compress.compensate.eora import EoRA
from compress.recipe import Calibration, Recipe


def full_recipe() -> Recipe:
    return Recipe(factorize=SVD(rank_budget=0.6), quantize=GPTQ(bits=3, group_size=64, symmetric=True, act_order=True),
                  calibration=Calibration(source="x.txt", nsamples=7, seqlen=32, seed=3), exclude=("mlp",),
                  gram_dtype="float32")


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_recipe_round_trips_through_files(tmp_path, suffix):
    recipe = full_recipe()
    path = tmp_path / f"recipe{suffix}"
    path.write_text(recipe.to_json() if suffix == ".json" else recipe.to_yaml())
    loaded = Recipe.load(path)
    assert loaded == recipe and type(loaded.quantize) is GPTQ and loaded.true_sequential


def test_every_method_of_the_table_round_trips():
    for stage, table in METHODS.items():
        for name, (config, _) in table.items():
            stages = {"quantize": RTN()} if stage == "compensate" else {}
            recipe = Recipe(**{**stages, stage: config()})
            data = recipe.to_dict()
            assert data[stage]["method"] == name and method_name(getattr(recipe, stage)) == name
            assert Recipe.from_dict(data) == recipe


def test_unknown_keys_are_named():
    data = full_recipe().to_dict()
    data["quantize"]["bitz"] = 4
    with pytest.raises(CompressError, match=r"recipe.quantize \(gptq\): unknown key.*bitz"):
        Recipe.from_dict(data)
    with pytest.raises(CompressError, match="unknown key.*stages"):
        Recipe.from_dict({"stages": []})
    with pytest.raises(CompressError, match="unknown method 'magic'"):
        Recipe.from_dict({"factorize": {"method": "magic"}, "true_sequential": True})


# What `recipe.yaml` held before per-method configs: every stage carried every method's keys.
LEGACY = """
factorize:
  method: saes-svd
  rank_budget: 0.6
  allocate: uniform
  beta: null
  beta_min: 0.3
  beta_max: 0.75
quantize:
  method: cbq
  bits: 3
  group_size: 64
  symmetric: false
  act_order: false
  static_groups: false
  damp: 0.01
  rank: null
  iterations: 50
  lr: 0.001
  seed: 0
  window: 3
  overlap: 1
compensate: null
calibration: {source: null, nsamples: 16, seqlen: 64, seed: 0}
include: []
exclude: []
"""


def test_old_recipe_files_load_as_they_ran(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(LEGACY.replace("saes-svd", "svd-llm").replace("beta_min: 0.3", "beta_min: 0.25")
                    .replace("method: cbq", "method: gptq").replace("iterations: 50", "iterations: 200")
                    .replace("window: 3", "window: 2"))
    recipe = Recipe.load(path)
    # what GPTQ's defaults were then: no act-order, no static groups, min-max grid
    old_gptq = GPTQ(bits=3, group_size=64, act_order=False, static_groups=False, clip="minmax")
    assert recipe == Recipe(factorize=SVDLLM(0.6), quantize=old_gptq,
                            calibration=Calibration(nsamples=16, seqlen=64), true_sequential=False)


def test_old_recipe_keys_keep_their_meaning():
    data = __import__("yaml").safe_load(LEGACY)
    data["factorize"] = None
    recipe = Recipe.from_dict(data)
    # rank None was CBQ's 5; the grid was min-max
    assert recipe.quantize == CBQ(bits=3, group_size=64, iterations=50, window=3, overlap=1, clip="minmax")
    data["quantize"]["method"] = "rtn"
    with pytest.raises(CompressError, match="iterations, window do.*not apply to rtn.*true_sequential: false"):
        Recipe.from_dict(data)


def test_old_saes_recipe_keeps_its_beta_range():
    data = __import__("yaml").safe_load(LEGACY)
    data["quantize"] = None
    assert Recipe.from_dict(data).factorize == SAES(rank_budget=0.6, beta_min=0.3, ridge=0.0)  # no ridge then


@pytest.mark.parametrize("make, message", [
    (lambda: SVD(rank_budget=0.0), "rank budget"),
    (lambda: SVDLLM(rank_budget=1.5), "rank budget"),
    (lambda: SVDLLM(allocate="lorap"), "unknown allocator 'lorap' for SVDLLM"),
    (lambda: RTN(bits=5), "wbits"),
    (lambda: GPTQ(damp=2.0), "damp"),
    (lambda: CBQ(window=2, overlap=2), "overlap < window"),
    (lambda: EoRA(rank=0), "compensation rank"),
    (lambda: Recipe(), "nothing to do"),
    (lambda: Recipe(quantize=SVD()), "recipe.quantize must be a quantize method's config"),
    (lambda: Recipe(factorize=SVD(), quantize=CBQ()), "cbq learns the quantized weights of whole blocks"),
    (lambda: Recipe(quantize=GPTQ(), gram_dtype="float16"), "gram_dtype must be one of auto, float64, float32"),
])
def test_invalid_settings_are_refused(make, message):
    with pytest.raises(CompressError, match=message):
        make()
