import pytest
import torch

from dropup.config import ModelConfig, MoEConfig


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture
def gqa_model() -> ModelConfig:
    """A tiny Llama with grouped-query attention (2 query heads per KV head) and a non-default rope theta."""
    return ModelConfig(name="t", vocab_size=97, n_layers=2, d_model=32, d_ff=64, n_heads=4, n_kv_heads=2, rope_theta=500.0)


@pytest.fixture
def moe8() -> MoEConfig:
    return MoEConfig(enabled=True, num_experts=8, top_k=2)


@pytest.fixture(scope="session")
def store(tmp_path_factory):
    """Prepared data and seed models shared by every test (each is built once, like in real use)."""
    root = tmp_path_factory.mktemp("store")
    return [f"paths.data_dir={root / 'data'}", f"paths.seed_store={root / 'seeds'}"]
