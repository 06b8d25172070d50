"""lora.py: only the adapters train, B = 0 starts at the base model, merging is exact; PEFT folders both ways."""
import json
import re

import pytest
import torch
from conftest import tiny_cfg

from hf_checkpoint import load_pretrained, save_pretrained
from lora import PEFT_CONFIG, apply_lora, load_peft_adapter, merge_lora, save_peft_adapter
from model import create_model


def test_lora_trains_only_adapters_and_merges_exactly():
    cfg = tiny_cfg()
    model = create_model(cfg, seed=0).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 10))
    before = model(tokens).detach()
    apply_lora(model, rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert len(trainable) == 2 * 3 * cfg.n_layers
    torch.testing.assert_close(model(tokens), before)  # B = 0 at the start
    model(tokens).sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" not in n)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_b" in n:
                p.normal_(0, 0.1)
    adapted = model(tokens).detach()
    assert not torch.allclose(adapted, before)
    merge_lora(model)
    assert not any(".lora_" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(model(tokens), adapted, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------------------------
# PEFT adapter folders, both ways, against peft itself (LoRA on every linear layer of a block).

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def randomize_adapters(model, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name.lower():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)


@pytest.mark.parametrize("rslora", [False, True])
def test_our_adapter_loads_in_peft_with_our_logits(tmp_path, rslora):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    cfg = tiny_cfg()
    ours = create_model(cfg, seed=0).eval()
    save_pretrained(ours, tmp_path / "base")
    apply_lora(ours, rank=4, alpha=8, targets=ALL_LINEAR, dropout=0.05, rslora=rslora)
    randomize_adapters(ours, seed=1)
    save_peft_adapter(ours, tmp_path / "adapter", base_model_name_or_path="tiny-base")
    config = json.loads((tmp_path / "adapter" / PEFT_CONFIG).read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["use_rslora"] == rslora
    assert sorted(config["target_modules"]) == sorted(ALL_LINEAR) and config["lora_dropout"] == 0.05
    base = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base")
    reference = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(reference(tokens).logits, ours.eval()(tokens), atol=1e-4, rtol=0)
    with pytest.raises(FileExistsError, match="not empty"):
        save_peft_adapter(ours, tmp_path / "adapter")


@pytest.mark.parametrize("merge", [True, False])
def test_peft_adapter_loads_here_with_peft_logits(tmp_path, merge):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    cfg = tiny_cfg()
    save_pretrained(create_model(cfg, seed=0), tmp_path / "base")
    base = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base")
    lora_config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=list(ALL_LINEAR), lora_dropout=0.05,
                                  use_rslora=True, task_type="CAUSAL_LM")
    reference = peft.get_peft_model(base, lora_config)
    randomize_adapters(reference, seed=2)
    reference.save_pretrained(tmp_path / "adapter")
    ours = load_peft_adapter(load_pretrained(tmp_path / "base"), tmp_path / "adapter", merge=merge).eval()
    assert any(".lora_" in n for n, _ in ours.named_parameters()) == (not merge)
    if not merge:
        trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
        assert len(trainable) == 2 * len(ALL_LINEAR) * cfg.n_layers and all(".lora_" in n for n in trainable)
    tokens = torch.randint(0, cfg.vocab_size, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), reference.eval()(tokens).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("change, needle", [
    ({"use_dora": True}, "use_dora=True is not supported"),
    ({"bias": "all"}, "bias='all' is not supported"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save=['lm_head'] is not supported"),
    ({"layers_to_transform": [0]}, "layers_to_transform=[0] is not supported"),
    ({"peft_type": "IA3"}, "peft_type='IA3'"),
    ({"r": 0}, "r is 0, expected a positive integer"),
])
def test_unsupported_peft_settings_are_refused_naming_the_field(tmp_path, change, needle):
    model = apply_lora(create_model(tiny_cfg(), seed=0), rank=2, alpha=4)
    save_peft_adapter(model, tmp_path / "adapter")
    path = tmp_path / "adapter" / PEFT_CONFIG
    path.write_text(json.dumps(json.loads(path.read_text()) | change))
    with pytest.raises(ValueError, match=re.escape(needle)):
        load_peft_adapter(create_model(tiny_cfg(), seed=0), tmp_path / "adapter")


def test_peft_adapter_of_another_shape_is_refused_before_any_change(tmp_path):
    save_peft_adapter(apply_lora(create_model(tiny_cfg(), seed=0), rank=2, alpha=4), tmp_path / "adapter")
    model = create_model(tiny_cfg(dim=128, n_heads=4, n_kv_heads=2), seed=0)
    before = {n: p.clone() for n, p in model.named_parameters()}
    needle = r"layers\.0\.self_attn\.k_proj\.lora_A\.weight has shape \(2, 64\), expected \(2, 128\)"
    with pytest.raises(ValueError, match=needle):
        load_peft_adapter(model, tmp_path / "adapter")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
