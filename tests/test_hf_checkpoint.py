"""hf_checkpoint.py: model folders found, memory checked, HF folders load with transformers' logits, and ours (weights,
config, generation config, tokenizer) load in transformers."""
import json
import re
import shutil

import pytest
import torch
from conftest import LLAMA_TOKENIZER, tiny_cfg

import hf_checkpoint
from data import Tokenizer
from hf_checkpoint import (GiB, MODEL_REPOS, available_bytes, check_inference_memory, check_training_memory,
                           checkpoint_dtype, inference_bytes, load_pretrained, resolve_model, save_pretrained,
                           training_bytes, training_fit_advice)
from model import MODEL_PRESETS, ModelConfig, create_model

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


# ----------------------------------------------------------------------------------------------------------------------
# Model folders: --model NAME resolves to a local folder (never a download).


def fake_cache_model(cache, repo="meta-llama/Llama-2-7b-hf", revision="abc123"):
    """A Hugging Face cache entry (models--org--name/snapshots/<revision>, refs/main) holding a tiny model."""
    entry = cache / f"models--{repo.replace('/', '--')}"
    save_pretrained(create_model(tiny_cfg(), seed=0), entry / "snapshots" / revision)
    (entry / "refs").mkdir(exist_ok=True)
    (entry / "refs" / "main").write_text(revision)
    return entry / "snapshots" / revision


def test_model_name_resolves_in_the_hf_cache_then_model_dir_first(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    older = fake_cache_model(tmp_path / "hub", revision="old")
    snapshot = fake_cache_model(tmp_path / "hub", revision="abc123")  # refs/main names this one
    assert resolve_model("llama2-7b") == snapshot
    assert resolve_model("meta-llama/Llama-2-7b-hf") == snapshot
    assert load_pretrained(resolve_model("llama2-7b")).cfg == tiny_cfg()
    (tmp_path / "hub" / "models--meta-llama--Llama-2-7b-hf" / "refs" / "main").write_text("gone")
    assert resolve_model("llama2-7b") in (older, snapshot)  # no valid ref: a snapshot holding config.json
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # $HF_HOME/hub
    assert resolve_model("llama2-7b") in (older, snapshot)
    for layout in ("llama2-7b", "Llama-2-7b-hf", "meta-llama/Llama-2-7b-hf"):
        models = tmp_path / f"models-{layout.replace('/', '-')}"
        save_pretrained(create_model(tiny_cfg(), seed=0), models / layout)
        assert resolve_model("llama2-7b", model_dir=models) == models / layout  # --model-dir before the cache
    assert resolve_model(snapshot) == snapshot  # a plain path


def test_missing_model_is_one_line_naming_the_places_and_the_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ValueError) as error:
        resolve_model("llama2-7b", model_dir=tmp_path / "models")
    message = str(error.value)
    assert "\n" not in message and message.startswith("model llama2-7b: not found in ")
    for place in (tmp_path / "models" / "llama2-7b", tmp_path / "models" / "Llama-2-7b-hf",
                  tmp_path / "hub" / "models--meta-llama--Llama-2-7b-hf"):
        assert str(place) in message
    assert "huggingface-cli download meta-llama/Llama-2-7b-hf" in message
    assert "hf download meta-llama/Llama-2-7b-hf" in message
    with pytest.raises(ValueError, match="not a preset: llama2-7b, "):
        resolve_model("no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        resolve_model(tmp_path / "empty")
    assert set(MODEL_REPOS) == set(MODEL_PRESETS) - {"tiny"}


# ----------------------------------------------------------------------------------------------------------------------
# Memory: estimated before allocating, refused with both numbers and what would fit.


def test_memory_check_refuses_a_7b_on_a_small_budget(monkeypatch):
    cfg = MODEL_PRESETS["llama2-7b"]
    full = training_bytes(cfg, seq_len=4096)
    assert training_bytes(cfg, world=2, seq_len=4096) < full
    assert training_bytes(cfg, lora_rank=16, seq_len=4096) < full
    assert training_bytes(cfg, activation_checkpointing=True, seq_len=4096) < full
    assert 16 * cfg.num_params() < full < 20 * cfg.num_params() + 40 * GiB  # fp32 master + grads + AdamW + more
    assert 2 * cfg.num_params() < inference_bytes(cfg, torch.bfloat16, 8192) < 2 * cfg.num_params() + 8 * GiB
    monkeypatch.setattr(hf_checkpoint, "available_bytes", lambda device: 24 * GiB)
    with pytest.raises(ValueError) as error:
        check_training_memory(cfg, "cpu", seq_len=4096)
    message = str(error.value)
    assert "\n" not in message and "needs about 135.7 GiB, 24.0 GiB is available" in message
    assert "nothing would fit" in message and "--no-memory-check" in message  # CPU: more processes add nothing
    with pytest.raises(ValueError, match=r"needs about \d+\.\d GiB, 24\.0 GiB is available; would fit: .*--precision"):
        check_inference_memory(cfg, "cpu", torch.float32, 8192)
    advice = training_fit_advice(cfg, 80 * GiB, seq_len=4096)  # an 80 GB GPU
    assert advice.startswith("would fit: 2 processes (GPUs)") and "--lora-rank 16" in advice
    advice = training_fit_advice(cfg, 24 * GiB, seq_len=4096)
    assert "--activation-checkpointing" in advice and "--lora-rank 16" in advice
    assert check_training_memory(tiny_cfg(), "cpu", seq_len=64) < 24 * GiB  # fits: returns the estimate


def test_available_bytes_reads_the_host():
    assert 0 < available_bytes("cpu") < 2**50


# ----------------------------------------------------------------------------------------------------------------------
# final/: a complete Hugging Face folder; transformers reads our weights, config and tokenizer exactly.

TEXTS = ["The patient presented with fever.", "Hello world", "", " ", "  leading spaces", "a\n\nb  c\t d", " The",
         "trailing  ", "literal <s> and </s> tags", "naïve café, 中文, emoji 😀", "ｆｕｌｌ width ﬁ", "x\r\ny\x01z"]


def saved_source(tmp_path, tokenizer_file, dtype):
    """A source checkpoint as a user has it: weights in `dtype` + the tokenizer.model only."""
    cfg = tiny_cfg(Tokenizer(tokenizer_file).vocab_size)
    save_pretrained(create_model(cfg, dtype=dtype, seed=3), tmp_path / "source")
    shutil.copyfile(tokenizer_file, tmp_path / "source" / "tokenizer.model")
    return tmp_path / "source"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_final_folder_round_trip_in_transformers_with_the_llama2_tokenizer(tmp_path, dtype):
    if not LLAMA_TOKENIZER.is_file():
        pytest.skip("../shared/data/llama2-tokenizer not present")
    source = saved_source(tmp_path, LLAMA_TOKENIZER, dtype)
    assert checkpoint_dtype(source) == dtype
    ours = load_pretrained(source)  # trained in fp32, saved back in the source's dtype
    tok = Tokenizer.resolve(None, source)
    final = save_pretrained(ours, tmp_path / "final", checkpoint_dtype(source), tokenizer=tok, source=source)
    assert {p.name for p in final.iterdir()} == {"model.safetensors", "config.json", "generation_config.json",
                                                 "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                                                 "special_tokens_map.json"}
    assert checkpoint_dtype(final) == dtype and load_pretrained(final, dtype=dtype).lm_head.weight.dtype == dtype
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(final)
    for text in TEXTS:
        assert hf_tokenizer(text)["input_ids"] == tok.encode(text, bos=True), repr(text)
    assert (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id) == (tok.bos_id, tok.eos_id) == (1, 2)
    generation = transformers.GenerationConfig.from_pretrained(final)
    assert (generation.bos_token_id, generation.eos_token_id) == (1, 2)
    reference = transformers.LlamaForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode(TEXTS[0] + " " + TEXTS[9], bos=True)])
    with torch.no_grad():
        torch.testing.assert_close(reference(ids).logits, load_pretrained(final)(ids), atol=1e-4, rtol=0)


def test_built_tokenizer_json_matches_a_normalizing_sentencepiece_model(tmp_path, tokenizer_path):
    """The test tokenizers use sentencepiece's default nmt_nfkc normalizer (NFKC, whitespace folded): the built
    tokenizer.json reproduces it."""
    save_pretrained(create_model(tiny_cfg(), seed=0), tmp_path / "final", tokenizer=tokenizer_path)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "final")
    tok = Tokenizer(tokenizer_path)
    for text in TEXTS + ["The patient reduced the dose 3 times.", "\tA doctor\n\nshowed   profits  "]:
        assert hf_tokenizer(text)["input_ids"] == tok.encode(text, bos=True), repr(text)


def test_source_tokenizer_and_generation_files_are_copied_unchanged(tmp_path, tokenizer_path):
    source = saved_source(tmp_path, tokenizer_path, torch.float32)
    files = {"tokenizer_config.json": '{"tokenizer_class": "LlamaTokenizer", "custom": 1}',
             "special_tokens_map.json": '{"bos_token": "<s>"}', "generation_config.json": '{"temperature": 0.6}'}
    for name, text in files.items():
        (source / name).write_text(text)
    final = save_pretrained(load_pretrained(source), tmp_path / "final", source=source)
    assert all((final / name).read_text() == text for name, text in files.items())
    assert (final / "tokenizer.model").read_bytes() == (source / "tokenizer.model").read_bytes()
    assert (final / "tokenizer.json").is_file()  # the one file the source lacked


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    def fail(*args):
        raise RuntimeError("disk full")
    monkeypatch.setattr(hf_checkpoint, "write_tokenizer_files", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        save_pretrained(create_model(tiny_cfg(), seed=0), tmp_path / "final", tokenizer="x/tokenizer.model")
    assert list(tmp_path.iterdir()) == []


def test_a_tokenizer_json_checkpoint_keeps_its_tokenizer_files(tmp_path, tokenizer_path):
    """Llama-3.x: no tokenizer.model; tokenizer.json and tokenizer_config.json are copied as they are."""
    built = tmp_path / "built"
    save_pretrained(create_model(tiny_cfg(), seed=0), built, tokenizer=tokenizer_path)  # a tokenizer.json to reuse
    source = tmp_path / "source"
    save_pretrained(create_model(tiny_cfg(), seed=0), source)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(built / name, source / name)
    tok = Tokenizer.resolve(None, source)
    assert tok.path.endswith("tokenizer.json") and tok.encode("The dose", bos=True)[0] == 1
    final = save_pretrained(load_pretrained(source), tmp_path / "final", tokenizer=tok, source=source)
    assert not (final / "tokenizer.model").exists() and not (final / "special_tokens_map.json").exists()
    assert all((final / name).read_bytes() == (source / name).read_bytes()
               for name in ("tokenizer.json", "tokenizer_config.json"))
    assert Tokenizer.resolve(None, final).encode("The dose", bos=True) == tok.encode("The dose", bos=True)
