import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported: it reads these once
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
# before transformers imports triton
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from compress.models import DEMO_DIR

torch.set_num_threads(2)


def tiny_llama(seed: int = 0, vocab_size: int = 4096) -> LlamaForCausalLM:
    """A 2-block Llama with grouped-query attention and random weights, for plumbing tests."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def one_thread():
    """Training steps on tiny tensors run several times faster on one intra-op thread than on two loaded ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def demo_tokenizer():
    return AutoTokenizer.from_pretrained(DEMO_DIR)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, demo_tokenizer):
    """A saved tiny Llama with the demo tokenizer: a local model directory like a user's."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_llama(vocab_size=len(demo_tokenizer))
    model.save_pretrained(path)
    demo_tokenizer.save_pretrained(path)
    return path
