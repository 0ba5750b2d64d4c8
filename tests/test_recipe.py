import pytest

from compress.errors import CompressError
from compress.recipe import Calibration, Factorize, Quantize, Recipe


def full_recipe() -> Recipe:
    return Recipe(factorize=Factorize("svd", 0.6), quantize=Quantize(bits=3, group_size=64, symmetric=True),
                  calibration=Calibration(source="x.txt", nsamples=7, seqlen=32, seed=3), exclude=("mlp",))


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_recipe_round_trips_through_files(tmp_path, suffix):
    recipe = full_recipe()
    path = tmp_path / f"recipe{suffix}"
    path.write_text(recipe.to_json() if suffix == ".json" else recipe.to_yaml())
    assert Recipe.load(path) == recipe


def test_unknown_keys_are_named():
    data = full_recipe().to_dict()
    data["quantize"]["bitz"] = 4
    with pytest.raises(CompressError, match="recipe.quantize: unknown key.*bitz"):
        Recipe.from_dict(data)
    with pytest.raises(CompressError, match="unknown key.*stages"):
        Recipe.from_dict({"stages": []})


@pytest.mark.parametrize("make, message", [
    (lambda: Factorize(rank_budget=0.0), "rank budget"),
    (lambda: Factorize(rank_budget=1.5), "rank budget"),
    (lambda: Quantize(bits=5), "wbits"),
    (lambda: Factorize(method="magic"), "unknown factorize method"),
    (lambda: Recipe(), "nothing to do"),
])
def test_invalid_settings_are_refused(make, message):
    with pytest.raises(CompressError, match=message):
        make()
