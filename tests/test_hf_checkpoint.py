"""hf_checkpoint.py: Hugging Face folders load with transformers' logits, and ours load in transformers."""
import pytest
import torch
from conftest import tiny_cfg

from hf_checkpoint import load_pretrained, save_pretrained
from model import ModelConfig, create_model

transformers = pytest.importorskip("transformers")


def hf_model(cfg: ModelConfig, seed=0):
    torch.manual_seed(seed)
    fields = {k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures", "model_type", "torch_dtype")}
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields)).eval()
    with torch.no_grad():  # HF initialises norms to 1; randomise them so a swapped norm weight cannot hide
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.1)
    return model


CONFIGS = {"mha": tiny_cfg(n_kv_heads=4), "gqa": tiny_cfg(), "tied": tiny_cfg(tie_embeddings=True)}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("shard", ["none", "sharded"])
def test_logits_match_transformers(tmp_path, name, shard):
    cfg = CONFIGS[name]
    reference = hf_model(cfg)
    reference.save_pretrained(tmp_path, max_shard_size="60KB" if shard == "sharded" else "5GB")
    assert (tmp_path / "model.safetensors.index.json").exists() == (shard == "sharded")
    ours = load_pretrained(tmp_path).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 23))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), reference(tokens).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("shard_bytes", [10**10, 50_000])
def test_save_pretrained_loads_in_transformers(tmp_path, shard_bytes):
    cfg = tiny_cfg()
    ours = create_model(cfg, seed=1).eval()
    save_pretrained(ours, tmp_path / "out", shard_bytes=shard_bytes)
    assert (tmp_path / "out" / "model.safetensors.index.json").exists() == (shard_bytes < 10**10)
    reference = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(reference(tokens).logits, ours(tokens), atol=1e-4, rtol=0)
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        save_pretrained(ours, tmp_path / "out")
