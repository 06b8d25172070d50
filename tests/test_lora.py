"""lora.py: only the adapters train, B = 0 starts at the base model, merging is exact."""
import torch
from conftest import tiny_cfg

from lora import apply_lora, merge_lora
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
