import json
import shutil

import pytest

from compress import RTN, CompressError, Recipe, compress_model, load_compressed, save_compressed
from compress.recipe import Calibration


@pytest.fixture(scope="module")
def saved(tiny_model_dir, tmp_path_factory):
    recipe = Recipe(quantize=RTN(bits=4, group_size=32), calibration=Calibration(nsamples=2, seqlen=16))
    result = compress_model(str(tiny_model_dir), recipe, progress=False)
    return save_compressed(result, tmp_path_factory.mktemp("native") / "out")


@pytest.fixture
def copy(saved, tmp_path):
    return shutil.copytree(saved, tmp_path / "copy")


def test_truncated_file_is_refused(copy):
    data = (copy / "model.safetensors").read_bytes()
    (copy / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CompressError, match="truncated"):
        load_compressed(copy)


def test_bit_flip_is_refused(copy):
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0x10
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CompressError, match="corrupt"):
        load_compressed(copy)


def test_wrong_format_version_is_refused(copy):
    config = json.loads((copy / "compression_config.json").read_text())
    config["format_version"] = 99
    (copy / "compression_config.json").write_text(json.dumps(config))
    with pytest.raises(CompressError, match="format version 99"):
        load_compressed(copy)


def test_corrupt_config_is_refused(copy):
    (copy / "compression_config.json").write_text('{"format": "compress-nat')
    with pytest.raises(CompressError, match="corrupt"):
        load_compressed(copy)


def test_layer_spec_that_disagrees_with_tensors_is_refused(copy):
    config = json.loads((copy / "compression_config.json").read_text())
    config["layers"]["model.layers.0.mlp.up_proj"]["base"]["bits"] = 8
    (copy / "compression_config.json").write_text(json.dumps(config))
    with pytest.raises(CompressError, match="shape"):
        load_compressed(copy)


def test_plain_directory_is_not_a_compressed_model(tiny_model_dir):
    with pytest.raises(CompressError, match="not a compressed model directory"):
        load_compressed(tiny_model_dir)
