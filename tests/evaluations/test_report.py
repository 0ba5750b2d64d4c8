"""`compress report`: outputs side by side in a markdown table, JSON rows and a Pareto plot."""
import json

from compress.cli import main
from evaluations.report import describe, pareto_front

RECIPES = {
    "w4": {"factorize": None, "compensate": None,
           "quantize": {"method": "gptq", "bits": 4, "group_size": 128, "symmetric": True, "act_order": False}},
    "r0.5": {"factorize": {"method": "svd-llm", "rank_budget": 0.5, "allocate": "uniform"}, "quantize": None,
             "compensate": None},
}


def fake_output(path, recipe, bits, perplexity, accuracy):
    """The files `compress report` reads from an output: report.json, compression_config.json, eval.json."""
    path.mkdir()
    (path / "report.json").write_text(json.dumps({"bits_per_weight": bits}))
    (path / "compression_config.json").write_text(json.dumps({"recipe": recipe}))
    (path / "eval.json").write_text(json.dumps({
        "model": str(path), "perplexity": perplexity, "source": "demo", "seqlen": 256,
        "tasks": {"python_next_line": {"acc": accuracy, "acc_stderr": 0.02, "acc_norm": accuracy - 0.01}}}))


def test_report_writes_table_json_and_png(capsys, tmp_path):
    fake_output(tmp_path / "w4", RECIPES["w4"], 4.125, 21.5, 0.61)
    fake_output(tmp_path / "r0.5", RECIPES["r0.5"], 8.0, 40.0, 0.52)
    (tmp_path / "original.json").write_text(json.dumps({
        "model": "demo", "perplexity": 20.0, "source": "demo", "seqlen": 256,
        "tasks": {"python_next_line": {"acc": 0.63, "acc_stderr": 0.02, "acc_norm": 0.6}}}))
    out = tmp_path / "report"
    assert main(["report", str(tmp_path / "w4"), str(tmp_path / "original.json"), str(tmp_path / "r0.5"),
                 "--out", str(out)]) == 0
    table = (out / "report.md").read_text()
    assert table in capsys.readouterr().out
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| name | recipe | bits/weight | perplexity | python_next_line acc")
    assert [line.split(" | ")[0] for line in lines[1:]] == ["| demo", "| r0.5", "| w4"]  # by bits, largest first
    assert "| w4 | gptq w4 g128 sym | 4.125 | 21.500 | 0.610 ± 0.020 | 0.600 |" in table
    rows = json.loads((out / "report.json").read_text())
    assert [row["bits_per_weight"] for row in rows] == [16.0, 8.0, 4.125]
    assert rows[0]["recipe"] == "original" and rows[2]["tasks"]["python_next_line"]["acc"] == 0.61
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["report", str(tmp_path / "w4"), "--out", str(out)]) == 2  # exists: needs --overwrite


def test_report_refuses_a_directory_that_is_not_an_output(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 2
    assert "report.json does not exist" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_pareto_front_and_recipe_names():
    points = [(4.0, 30.0), (5.0, 25.0), (4.5, 35.0), (8.0, 25.0), (16.0, 20.0)]
    assert pareto_front(points, higher_is_better=False) == [(4.0, 30.0), (5.0, 25.0), (16.0, 20.0)]
    assert pareto_front([(4.0, 0.5), (5.0, 0.4), (6.0, 0.6)], higher_is_better=True) == [(4.0, 0.5), (6.0, 0.6)]
    assert describe(RECIPES["w4"]) == "gptq w4 g128 sym" and describe(RECIPES["r0.5"]) == "svd-llm r0.5"
    assert describe({**RECIPES["w4"], "compensate": {"method": "eora", "rank": 16, "factor_bits": None}}) == \
        "gptq w4 g128 sym + eora r16"
