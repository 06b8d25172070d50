"""evaluate.py: sklearn-equal metrics, PEFT adapters and soft prompt files, the paper's tables and --compare, the CLI
(model resolution, end to end on a tiny random model, torchrun ranks). Result files and samples:
test_evaluate_results.py; generation: test_evaluate_generation.py; bad inputs: test_evaluate_reliability.py."""
import json

import pytest
import torch

import evaluate as ev
from conftest import LLAMA_TOKENIZER, ROOT, needs_data, tiny_cfg, torchrun
from hf_checkpoint import save_pretrained
from lora import apply_lora, save_peft_adapter
from model import create_model

RANDOM_TINY = ["--random-init", "--tokenizer", str(LLAMA_TOKENIZER), "--no-progress"]


def test_f1_matches_sklearn_on_worked_examples():
    # sklearn.metrics.f1_score docstring: per-class F1 [0.8, 0, 0] -> macro 0.2667, weighted 0.2667.
    weighted, macro = ev.f1_scores([0, 1, 2, 0, 1, 2], [0, 2, 1, 0, 0, 1])
    assert (weighted, macro) == pytest.approx((0.26666666, 0.26666666))
    # A class that is predicted but never true counts in macro (F1 0) and weighs 0 in weighted:
    # F1 class 0 = 2*2/(4+0+1) = 0.8, class 1 = 1, class 2 = 0 -> macro 0.6, weighted (3*0.8 + 1*1)/4 = 0.85.
    assert ev.f1_scores([0, 0, 0, 1], [0, 0, 2, 1]) == pytest.approx((0.85, 0.6))
    # Unequal supports: class a (support 3): TP 2, FP 1, FN 1 -> 2/3; class b (support 1): TP 0 -> 0.
    assert ev.f1_scores(["a", "a", "a", "b"], ["a", "a", "b", "a"]) == pytest.approx((0.5, 1 / 3))
    assert ev.accuracy([1, 2, 3, 4], [1, 2, 0, 0]) == 0.5


def test_peft_adapter_is_applied(tmp_path):
    cfg = tiny_cfg()
    adapted = apply_lora(create_model(cfg, seed=0), rank=4, alpha=8.0, targets=("q_proj", "v_proj")).eval()
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 0.1)
    save_peft_adapter(adapted, tmp_path / "adapter")
    save_pretrained(create_model(cfg, seed=0), tmp_path / "base")
    run_cfg = ev.EvalConfig(checkpoint=str(tmp_path / "base"), adapter=str(tmp_path / "adapter"), precision="fp32",
                            batch_tokens=64)
    env = ev.Dist()
    model = ev.load_eval_model(run_cfg, tmp_path / "base", cfg, env)
    tokens = torch.randint(0, cfg.vocab_size, (2, 12))
    assert torch.allclose(model(tokens), adapted(tokens), atol=1e-4)
    # A partial adapter (one B matrix missing) and junk files are refused with their file named.
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    from safetensors.torch import load_file, save_file
    tensors = load_file(weights)
    save_file({k: v for k, v in list(tensors.items())[1:]}, weights)
    with pytest.raises(ValueError, match="adapter_model.safetensors: .*lora_A.weight is missing"):
        ev.load_eval_model(run_cfg, tmp_path / "base", cfg, env)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ev.DataError, match="junk.safetensors: not a safetensors file"):
        ev.load_soft_prompt(tmp_path / "junk.safetensors", cfg.dim)


def result(name, anatomy, medqa, fiqa):
    return {"name": name, "tasks": {
        "mmlu-medical": {"accuracy": anatomy, "n": 10, "subjects": {"anatomy": {"accuracy": anatomy, "n": 10}}},
        "medqa": {"accuracy": medqa, "n": 10},
        "fiqa-sa": {"accuracy": 0.9, "weighted_f1": fiqa, "macro_f1": 0.1, "n": 10}}}


def test_tables_and_compare_cli(tmp_path, capsys):
    (tmp_path / "a.json").write_text(json.dumps(result("base", 0.5, 0.25, 0.6)))
    (tmp_path / "b.json").write_text(json.dumps(result("cft", 0.6, 0.25, 0.3)))
    ev.main(["--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    out = capsys.readouterr().out
    # The paper's blocks, each averaged over its own domain (medical: MMLU subjects + MedQA; finance: FiQA-SA ...);
    # a block of one column has no average. Files without standard errors show none.
    assert "| model | Anatomy | MedQA | Medical avg |" in out and "| model | FiQA-SA (wF1) |" in out
    assert "| base | 50.0 | 25.0 | 37.5 |" in out and "| cft | 60.0 | 25.0 | 42.5 |" in out
    assert "| base | 60.0 |" in out and "| cft | 30.0 |" in out
    assert "| task | base | cft | Δ cft − base |" in out
    assert "| Anatomy | 50.0 | 60.0 | +10.0 |" in out and "| FiQA-SA (wF1) | 60.0 | 30.0 | -30.0 |" in out
    assert "| Medical avg | 37.5 | 42.5 | +5.0 |" in out
    assert "Average" not in out  # no average across domains


def test_model_name_resolves_through_model_dir_and_the_cache(tmp_path, tokenizer_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    save_pretrained(create_model(tiny_cfg(), seed=0), tmp_path / "models" / "Llama-2-7b-hf", tokenizer=tokenizer_path)
    cfg = ev.EvalConfig(model="llama2-7b", model_dir=str(tmp_path / "models"))
    assert ev.eval_model_folder(cfg, verbose=True) == tmp_path / "models" / "Llama-2-7b-hf"
    assert "model llama2-7b: using " in capsys.readouterr().err
    tok = ev.load_eval_tokenizer(cfg, tmp_path / "models" / "Llama-2-7b-hf")  # the folder's own tokenizer
    assert tok.vocab_size == 512
    with pytest.raises(SystemExit) as e:
        ev.main(["--model", "llama2-7b", "--tasks", "medqa"])
    assert str(e.value).startswith("error: model llama2-7b: not found in ") and "download" in str(e.value)


@needs_data
def test_cli_with_a_model_from_the_hugging_face_cache(tmp_path, tokenizer_path, monkeypatch):
    snapshot = tmp_path / "hub" / "models--meta-llama--Llama-2-7b-hf" / "snapshots" / "abc"
    save_pretrained(create_model(tiny_cfg(), seed=0), snapshot, tokenizer=tokenizer_path)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    ev.main(["--model", "llama2-7b", "--tasks", "fiqa-sa", "--shots", "0", "--limit", "2", "--scoring", "loglik",
             "--no-progress", "--out", str(tmp_path / "r.json")])
    config = json.loads((tmp_path / "r.json").read_text())["config"]
    assert config["checkpoint"] == str(snapshot) and config["tokenizer"] == str(snapshot / "tokenizer.model")
    assert config["random_init"] is False and config["model"] == "llama2-7b"


@needs_data
def test_cli_end_to_end_on_a_tiny_random_model(tmp_path):
    out = tmp_path / "r.json"
    ev.main(RANDOM_TINY + ["--tasks", "mmlu-medical,fiqa-sa", "--shots", "0", "--limit", "1", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["tasks"]["mmlu-medical"]["n"] == 6 and len(r["tasks"]["mmlu-medical"]["subjects"]) == 6
    assert set(r["tasks"]["fiqa-sa"]) >= {"accuracy", "weighted_f1", "macro_f1", "n"}
    ev.main(RANDOM_TINY + ["--suite", "icl", "--tasks", "fiqa-sa", "--limit", "1", "--out", str(tmp_path / "icl.json")])
    icl = json.loads((tmp_path / "icl.json").read_text())["tasks"]
    assert list(icl) == ["fiqa-sa k=0", "fiqa-sa k=1", "fiqa-sa k=4", "fiqa-sa k=8"]
    assert [icl[k]["shots"] for k in icl] == [0, 1, 4, 8] and all(icl[k]["n"] == 1 for k in icl)


@needs_data
def test_torchrun_ranks_give_the_single_process_predictions(tmp_path):
    # Both ways of answering: medqa by log-likelihood, fiqa-sa by FinBen generation (the finance default).
    argv = RANDOM_TINY + ["--tasks", "medqa,fiqa-sa", "--shots", "1", "--limit", "3"]
    ev.main(argv + ["--out", str(tmp_path / "one.json")])
    torchrun(ROOT / "evaluate.py", argv + ["--out", str(tmp_path / "two.json")], cwd=tmp_path)
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert two["config"]["world"] == 2
    for task in ("medqa", "fiqa-sa"):
        assert two["tasks"][task]["predictions"] == one["tasks"][task]["predictions"]
        assert two["tasks"][task]["n"] == 3
    assert (one["tasks"]["medqa"]["scoring"], one["tasks"]["fiqa-sa"]["scoring"]) == ("loglik", "generate")
