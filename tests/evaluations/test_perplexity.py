import os

from evaluations.perplexity import cached_perplexity


def test_original_perplexity_is_kept_while_model_and_text_are_the_same(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    text = tmp_path / "eval.txt"
    text.write_text("some text")
    calls = []

    def evaluate():
        calls.append(1)
        return {"perplexity": 10.0 + len(calls), "source": str(text)}

    first = cached_perplexity(model, text, evaluate)
    assert cached_perplexity(model, text, evaluate) == first and len(calls) == 1  # kept
    text.write_text("other text")
    assert cached_perplexity(model, text, evaluate)["perplexity"] == 12.0  # another text: scored again
    stat = (model / "model.safetensors").stat()
    os.utime(model / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert cached_perplexity(model, text, evaluate)["perplexity"] == 13.0  # the weights changed: scored again
    assert cached_perplexity("org/hub-model", text, evaluate)["perplexity"] == 14.0  # not local: never kept
    assert cached_perplexity("org/hub-model", text, evaluate)["perplexity"] == 15.0
