"""hf_checkpoint.py: Hugging Face folders load with transformers' logits, and ours load in transformers."""
import json
import re

import pytest
import torch
from conftest import tiny_cfg

from hf_checkpoint import load_pretrained, save_pretrained
from model import ModelConfig, create_model

transformers = pytest.importorskip("transformers")


def hf_model(cfg: ModelConfig, seed=0):
    torch.manual_seed(seed)
    fields = {k: v for k, v in cfg.to_hf_dict().items()
              if k not in ("architectures", "model_type", "torch_dtype", "rope_parameters")}
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


def llama3_style(tmp_path, **rope):
    """A tiny Llama-3.x-shaped checkpoint saved by transformers (rope_parameters as transformers >= 5 writes it)."""
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                                      max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=5,
                                      eos_token_id=[6, 7], rope_scaling=rope or None,
                                      rope_theta=500000.0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    model.save_pretrained(tmp_path / "ref")
    return model


@pytest.mark.parametrize("rope", [{}, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
                                  {"rope_type": "linear", "factor": 4.0}], ids=["default", "llama3", "linear"])
def test_llama3_style_configs_load_with_transformers_logits(tmp_path, rope):
    reference = llama3_style(tmp_path, **rope)
    written = json.loads((tmp_path / "ref" / "config.json").read_text())
    assert written.get("rope_parameters", {}).get("rope_theta") == 500000.0 or written.get("rope_theta") == 500000.0
    ours = load_pretrained(tmp_path / "ref").eval()
    assert ours.cfg.rope_theta == 500000.0 and ours.cfg.tie_embeddings and ours.cfg.bos_token_id == 5
    tokens = torch.randint(0, 512, (2, 200))  # past original_max_position_embeddings: the scaling matters
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), reference(tokens).logits, atol=1e-4, rtol=0)
    save_pretrained(ours, tmp_path / "ours")  # and back: transformers reads our config the same way
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(tokens).logits, reference(tokens).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("change, needle", [
    ({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}, "architectures"),
    ({"model_type": "mistral"}, "model_type='mistral'"),
    ({"sliding_window": 16}, "sliding_window=16"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope scaling of type 'dynamic'"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}}, "'yarn'"),
    ({"num_attention_heads": 0}, "num_attention_heads is 0, expected a positive integer"),
    ({"vocab_size": "512"}, "vocab_size is '512'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
])
def test_unsupported_configs_are_refused_naming_the_field(tmp_path, change, needle):
    config = tiny_cfg().to_hf_dict() | change
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=re.escape(needle)):
        ModelConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        ModelConfig.from_hf(tmp_path)
