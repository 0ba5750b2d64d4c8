"""Fuzz the native loader: a corrupted config or tensor file must raise CompressError (never anything else) or, for
the config, load exactly the model the unmutated output holds."""
import json
import os
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from compress import RTN, CompressError, Recipe, load_compressed
from compress.layer import CompressedLinear
from compress.pipeline import compress_to_directory
from compress.recipe import Calibration

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))  # CI's count; raise it for a longer campaign

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6)


@pytest.fixture(scope="module")
def saved(tiny_model_dir, tmp_path_factory):
    """A streamed output: one tensor file per block and one for the rest, each with its checksum."""
    out = tmp_path_factory.mktemp("fuzz") / "out"
    recipe = Recipe(quantize=RTN(bits=4, group_size=32), calibration=Calibration(nsamples=2, seqlen=16))
    compress_to_directory(str(tiny_model_dir), recipe, out, progress=False)
    return out


@pytest.fixture(scope="module")
def original(saved):
    return load_compressed(saved)


def specs(model) -> dict:
    """Each module's class name, or its spec for a compressed layer."""
    return {name: module.spec() if isinstance(module, CompressedLinear) else type(module).__name__
            for name, module in model.named_modules()}


def assert_same_model(model, reference) -> None:
    """The same modules (each compressed layer's spec), the same tensors bit for bit, the same logits."""
    assert type(model) is type(reference) and specs(model) == specs(reference)
    state, expected = model.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys()
    for key, tensor in expected.items():
        assert state[key].dtype == tensor.dtype and torch.equal(state[key], tensor), key
    ids = torch.arange(16).reshape(2, 8) * 7 % reference.config.vocab_size
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def paths_of(node, prefix=()):
    """Every (path, value) in a JSON tree."""
    yield prefix, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from paths_of(value, prefix + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from paths_of(value, prefix + (index,))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_config_is_refused_or_loads_the_same_model(saved, original, tmp_path_factory, data):
    copy = shutil.copytree(saved, tmp_path_factory.mktemp("case") / "copy")
    config = json.loads((copy / "compression_config.json").read_text())
    # Pick a top-level key first, so that the small 'files' and 'format' entries are hit as often as 'layers'.
    top = data.draw(st.sampled_from(sorted(config)))
    path = data.draw(st.sampled_from([path for path, _ in paths_of(config) if path and path[0] == top]))
    parent = config
    for key in path[:-1]:
        parent = parent[key]
    if data.draw(st.booleans()):
        del parent[path[-1]]
    else:
        parent[path[-1]] = data.draw(JSON_VALUES)
    (copy / "compression_config.json").write_text(json.dumps(config))
    try:
        loaded = load_compressed(copy)
    except CompressError:
        return
    assert_same_model(loaded, original)  # a mutation that loads must have touched nothing the model is built from


@settings(max_examples=max(1, EXAMPLES // 4), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(file=st.integers(0, 2), offset=st.floats(0, 1, exclude_max=True), flip=st.integers(1, 255),
       truncate=st.booleans())
def test_corrupted_tensor_file_is_refused(saved, tmp_path_factory, file, offset, flip, truncate):
    copy = shutil.copytree(saved, tmp_path_factory.mktemp("case") / "copy")
    target = copy / sorted(path.name for path in copy.glob("*.safetensors"))[file]
    data = bytearray(target.read_bytes())
    position = int(offset * len(data))
    if truncate:
        data = data[:position]
    else:
        data[position] ^= flip
    target.write_bytes(bytes(data))
    with pytest.raises(CompressError):
        load_compressed(copy)
