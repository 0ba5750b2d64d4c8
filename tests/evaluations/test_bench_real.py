"""evaluations/bench_real.py's plumbing: recipe names, the Pareto front, and results shared by two runs."""
import json

import pytest

from compress import GPTAQ, GPTQ, Calibration, CompressError, EoRA
from evaluations.bench_real import budget_of, pareto, parse_peer, parse_recipe, peer_options, save, searched

CALIBRATION = Calibration(nsamples=8, seqlen=512)


def test_recipe_names_say_every_setting():
    recipe = parse_recipe("gptaq-w3-g64-eora64", CALIBRATION)
    assert recipe.quantize == GPTAQ(bits=3, group_size=64) and recipe.compensate == EoRA(rank=64, factor_bits=4)
    old = parse_recipe("gptq-w4-g128-minmax-noact", CALIBRATION).quantize
    assert old == GPTQ(bits=4, group_size=128, clip="minmax", act_order=False, static_groups=False)
    assert parse_recipe("gptaq-w2-g64-eora32-fp16f-a1", CALIBRATION).compensate.factor_bits is None
    assert parse_recipe("gptaq-w2-g64-a1", CALIBRATION).quantize.alpha == 1.0
    assert parse_peer("llmcompressor-gptq-w3-g128") == ("llmcompressor-gptq", 3, 128)
    assert parse_peer("hqq-w2-g64") == ("hqq", 2, 64)
    assert parse_peer("autoround-w3-g128-light") == ("autoround", 3, 128)
    assert peer_options("autoround-w3-g128-light") == {"iters": 50, "lr": 5e-3} and not peer_options("hqq-w2-g64")


@pytest.mark.parametrize("name, message", [("awq-w4-g128", "unknown recipe"), ("gptq-w4-g128-fast", "unknown option"),
                                           ("rtn-w4-g64-a1", "alpha")])
def test_bad_recipe_names_are_refused(name, message):
    with pytest.raises(CompressError, match=message):
        parse_recipe(name, CALIBRATION)


def test_pareto_front_is_what_nothing_beats():
    points = [(4.5, 10.0), (4.1, 11.0), (4.2, 12.0), (3.1, 15.0), (3.5, 14.0), (3.6, 16.0), (2.2, 40.0)]
    rows = [{"name": str(i), "bits_per_weight": b, "perplexity": p} for i, (b, p) in enumerate(points)]
    front = pareto(rows)
    brute = [r for r in rows if all(not (o["bits_per_weight"] <= r["bits_per_weight"] and
                                         o["perplexity"] < r["perplexity"]) for o in rows)]
    assert front == sorted(brute, key=lambda r: r["bits_per_weight"])
    assert [r["name"] for r in front] == ["6", "3", "4", "1", "0"]


def test_two_runs_sharing_an_output_keep_each_others_rows(tmp_path):
    path = tmp_path / "results.json"
    settings = {"model": "m", "nsamples": 8}
    first = {"settings": settings, "peer_versions": {}, "rows": []}
    rows_a = save(path, first, {"fp": {"name": "fp"}, "a": {"name": "a"}})
    second = {"settings": settings, "peer_versions": {"hqq": "0.2"}, "rows": []}
    rows_b = save(path, second, {"b": {"name": "b"}})
    assert set(rows_b) == {"fp", "a", "b"} and set(rows_a) == {"fp", "a"}
    assert {row["name"] for row in json.loads(path.read_text())["rows"]} == {"fp", "a", "b"}
    # a row a run only read (loaded before another run recomputed it) does not overwrite the newer one
    save(path, second, {"a": {"name": "a", "perplexity": 2.0}}, computed={"a"})
    assert save(path, first, {"a": {"name": "a", "perplexity": 1.0}, "d": {"name": "d"}}, computed={"d"})["a"] == \
        {"name": "a", "perplexity": 2.0}
    other = {"settings": {**settings, "nsamples": 16}, "peer_versions": {}, "rows": []}
    assert set(save(path, other, {"c": {"name": "c"}})) == {"c"}  # other settings: the old rows are not mixed in


def test_a_searched_mix_is_compared_with_what_fits_its_budget():
    assert parse_recipe("gptaq-bpw3.25", Calibration()).bpw == 3.25 and budget_of("gptaq-bpw3.25") == 3.25
    assert budget_of("gptaq-w3-g64") is None
    rows = [{"name": "gptaq-bpw3.5", "tool": "compress", "bits_per_weight": 3.49, "perplexity": 15.0, "seconds": 100,
             "search_seconds": 20},
            {"name": "gptaq-w3-g64", "tool": "compress", "bits_per_weight": 3.3, "perplexity": 16.0, "seconds": 90},
            {"name": "gptaq-w3-g32", "tool": "compress", "bits_per_weight": 3.6, "perplexity": 14.0, "seconds": 90},
            {"name": "gptaq-w3-g128", "tool": "compress", "bits_per_weight": 3.2, "perplexity": 17.0, "seconds": 90},
            {"name": "hqq-w3-g64", "tool": "hqq", "bits_per_weight": 3.7, "perplexity": 90.0, "seconds": 9}]
    line = searched(rows).splitlines()[-1]
    assert line.startswith("| 3.5 | 3.490 | 15.000 | 20% | gptaq-w3-g64 (3.300) | 16.000 | - | - |")
