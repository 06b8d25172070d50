"""cft.py and real weights: --model NAME finds a Hugging Face folder (cache or --model-dir; never downloads), a missing
one is one line before anything is allocated, --random-init keeps random weights and says which tokenizer it uses,
the memory check refuses what cannot fit, the real-model demo (the fictional pharmacology in the model's own
tokenizer, CFT beside CPT), final/ in the source's dtype, PEFT adapter folders that peft loads with our logits, and
--merge-lora's full model."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import cft
import hf_checkpoint
from conftest import LLAMA_TOKENIZER, printed_by, tiny_cfg, tiny_run_inputs
from hf_checkpoint import load_pretrained, save_pretrained
from lora import load_peft_adapter
from model import ModelConfig, create_model

TRAIN = ["--seq-len", "128", "--batch-size", "4", "--micro-batch-size", "2", "--max-steps", "2", "--lr", "1e-3",
         "--device", "cpu", "--no-progress", "--heldout-fraction", "0"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_path):
    return tiny_run_inputs(tmp_path_factory.mktemp("cft-models"), tokenizer_path, 30)


def quietly(argv) -> str:
    return printed_by(cft.main, argv)


def data_args(setup: Path, out: Path, *extra) -> list[str]:
    return ["--data", str(setup / "corpus.jsonl"), "--out", str(out), "--cache-dir", str(setup / "cache"), *TRAIN,
            *extra]


def test_model_name_resolves_through_the_hugging_face_cache(setup, tmp_path, monkeypatch):
    snapshot = tmp_path / "hub" / "models--meta-llama--Llama-2-7b-hf" / "snapshots" / "abc123"
    shutil.copytree(setup / "ckpt", snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    printed = quietly(["--model", "llama2-7b", *data_args(setup, tmp_path / "run")])
    assert f"model llama2-7b: weights from {snapshot}\n" in printed
    assert f"tokenizer: {snapshot / 'tokenizer.model'} (the model's own)" in printed
    assert load_pretrained(tmp_path / "run" / "final").cfg == tiny_cfg(512)
    # --model-dir is looked in first; a resume by the same name compares the name, not where it was found
    shutil.copytree(setup / "ckpt", tmp_path / "models" / "Llama-2-7b-hf")
    printed = quietly(["--model", "llama2-7b", "--model-dir", str(tmp_path / "models"),
                       *data_args(setup, tmp_path / "run2", "--stop-after", "1")])
    assert f"weights from {tmp_path / 'models' / 'Llama-2-7b-hf'}" in printed
    assert "resumed from" in quietly(["--model", "llama2-7b", *data_args(setup, tmp_path / "run2", "--resume")])


def test_a_missing_model_is_one_line_before_anything_is_allocated(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))

    def never(*args, **kwargs):
        raise AssertionError("allocated a model for a run that cannot start")
    monkeypatch.setattr(cft, "build_language_model", never)
    monkeypatch.setattr(cft, "create_model", never)
    with pytest.raises(SystemExit) as e:
        quietly(["--model", "llama2-7b", *data_args(setup, tmp_path / "run")])
    message = e.value.code
    assert message.startswith("error: model llama2-7b: not found in") and "\n" not in message
    assert "hf download meta-llama/Llama-2-7b-hf" in message and "--random-init" in message
    assert not (tmp_path / "run").exists()


def test_random_init_says_which_tokenizer_it_uses(setup, tmp_path):
    printed = quietly(["--model", "tiny", "--random-init", "--method", "cft", "--max-steps", "1", "--no-progress",
                       "--out", str(tmp_path / "demo"), "--cache-dir", str(tmp_path / "cache")])
    assert "(the random-init demo's, trained on its documents)" in printed and "model tiny:" not in printed
    assert "closed-book accuracy on 96 fictional-fact questions" in printed
    printed = quietly(["--model", "tiny", "--random-init", "--tokenizer", str(setup / "ckpt" / "tokenizer.model"),
                       *data_args(setup, tmp_path / "data", "--max-steps", "1")])
    assert f"tokenizer: {setup / 'ckpt' / 'tokenizer.model'} (--tokenizer)" in printed
    assert load_pretrained(tmp_path / "data" / "final").cfg.vocab_size == 512
    with pytest.raises(SystemExit, match="--random-init with --data: pass --tokenizer FILE"):
        quietly(["--model", "tiny", "--random-init", *data_args(setup, tmp_path / "none")])
    with pytest.raises(SystemExit, match="--random-init needs --model PRESET"):
        quietly(["--random-init", *data_args(setup, tmp_path / "none")])


def test_the_memory_check_refuses_before_allocating_and_can_be_skipped(setup, tmp_path, monkeypatch):
    monkeypatch.setattr(hf_checkpoint, "available_bytes", lambda device: 24 * 2**30)
    with pytest.raises(SystemExit) as e:
        quietly(["--model", "llama2-7b", "--random-init", "--tokenizer", str(setup / "ckpt" / "tokenizer.model"),
                 *data_args(setup, tmp_path / "big")])
    message = e.value.code
    assert message.startswith("error: not enough memory on cpu: the run needs about") and "24.0 GiB is available" \
        in message and "--no-memory-check" in message and "\n" not in message
    assert not (tmp_path / "big").exists()
    monkeypatch.setattr(hf_checkpoint, "available_bytes", lambda device: 1)
    with pytest.raises(SystemExit, match="not enough memory"):
        quietly(["--checkpoint", str(setup / "ckpt"), *data_args(setup, tmp_path / "small")])
    quietly(["--checkpoint", str(setup / "ckpt"), "--no-memory-check", *data_args(setup, tmp_path / "small")])
    assert (tmp_path / "small" / "final").is_dir()


@pytest.fixture(scope="module")
def llama_like(tmp_path_factory):
    """A tiny random Llama saved in bf16 with the real Llama-2 tokenizer (32,000 pieces)."""
    if not LLAMA_TOKENIZER.is_file():
        pytest.skip("../shared/data/llama2-tokenizer not present")
    folder = tmp_path_factory.mktemp("llama") / "tiny-llama"
    cfg = ModelConfig(vocab_size=32000, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=512)
    save_pretrained(create_model(cfg, seed=0), folder, dtype=torch.bfloat16, tokenizer=LLAMA_TOKENIZER)
    return folder


def stored_dtype(folder: Path) -> str:
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        return f.get_slice(next(iter(f.keys()))).get_dtype()


def test_the_real_model_demo_uses_the_models_tokenizer_and_keeps_its_dtype(llama_like, tmp_path):
    out = tmp_path / "demo"
    printed = quietly(["--checkpoint", str(llama_like), "--max-steps", "1", "--no-progress", "--out", str(out),
                       "--cache-dir", str(tmp_path / "cache")])
    assert f"tokenizer: {llama_like / 'tokenizer.model'} (the model's own)" in printed
    assert "closed-book accuracy on 96 fictional-fact questions" in printed
    assert "\ncft " in printed and "\ncpt " in printed
    record = json.loads((out / "cft" / "config.json").read_text())
    assert (record["lr"], record["epochs"], record["seq_len"]) == (2e-5, 10, 256)  # the pretrained-model settings
    for method in ("cft", "cpt"):
        final = out / method / "final"
        assert json.loads((final / "config.json").read_text())["torch_dtype"] == "bfloat16"
        assert stored_dtype(final) == "BF16" and (final / "tokenizer.model").is_file()
        assert set(json.loads((final / "result.json").read_text())) == {"method", "before", "after", "loss",
                                                                          "seconds"}
    given = lambda *flags: cft.final_dtype(cft.parse_cft_args(["--checkpoint", str(llama_like), *flags]))
    assert (given(), given("--save-dtype", "fp32"), given("--save-dtype", "fp16")) == (torch.bfloat16, torch.float32,
                                                                                        torch.float16)
    assert cft.final_dtype(cft.parse_cft_args([])) is None  # random init: the trained fp32 weights as they are


@pytest.fixture(scope="module")
def adapter_runs(setup):
    """The same LoRA training written as a PEFT adapter folder and (--merge-lora) as a merged full model."""
    lora = ["--checkpoint", str(setup / "ckpt"), "--lora-rank", "4", "--lora-alpha", "8"]
    quietly([*lora, *data_args(setup, setup / "adapter")])
    quietly([*lora, "--merge-lora", *data_args(setup, setup / "merged")])
    return setup / "adapter" / "final", setup / "merged" / "final"


def test_lora_final_is_a_peft_adapter_that_peft_loads_with_our_logits(setup, adapter_runs):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    adapter, _ = adapter_runs
    names = {p.name for p in adapter.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.model", "result.json"} <= names
    assert "model.safetensors" not in names
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (4, 8, str(setup / "ckpt"))
    ours = load_peft_adapter(load_pretrained(setup / "ckpt"), adapter, merge=False).eval()
    base = transformers.LlamaForCausalLM.from_pretrained(setup / "ckpt")
    reference = peft.PeftModel.from_pretrained(base, adapter).eval()
    tokens = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs, mine, untrained = reference(tokens).logits, ours(tokens), load_pretrained(setup / "ckpt")(tokens)
    torch.testing.assert_close(theirs, mine, atol=1e-4, rtol=0)
    assert (mine - untrained).abs().max() > 1e-4  # the adapter was trained, not just initialised


def test_merge_lora_writes_the_merged_full_model(setup, adapter_runs):
    adapter, merged = adapter_runs
    assert (merged / "model.safetensors").is_file() and not (merged / "adapter_config.json").exists()
    tokens = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        from_adapter = load_peft_adapter(load_pretrained(setup / "ckpt"), adapter, merge=True)(tokens)
        torch.testing.assert_close(load_pretrained(merged)(tokens), from_adapter, atol=1e-5, rtol=0)
