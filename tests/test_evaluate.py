"""evaluate.py: sklearn-equal metrics, LoRA adapter and soft prompt files, tables and --compare, the CLI (bad inputs,
end to end on a tiny random model, torchrun ranks). Prompts: test_benchmark_data.py; scoring: test_scoring.py."""
import json

import pytest
import torch
from safetensors.torch import save_file

import evaluate as ev
from conftest import ROOT, needs_data, tiny_cfg, torchrun
from lora import apply_lora
from model import create_model


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


def test_lora_adapter_file_is_applied(tmp_path):
    cfg = tiny_cfg()
    adapted = apply_lora(create_model(cfg, seed=0), rank=4, alpha=8.0, targets=("q_proj", "v_proj")).eval()
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 0.1)
    lora = {n: p.detach() for n, p in adapted.named_parameters() if ".lora_" in n}
    save_file(lora, tmp_path / "adapter.safetensors", metadata={"rank": "4", "alpha": "8.0"})
    model = create_model(cfg, seed=0).eval()
    ev.load_lora(model, tmp_path / "adapter.safetensors")
    tokens = torch.randint(0, cfg.vocab_size, (2, 12))
    assert torch.allclose(model(tokens), adapted(tokens), atol=1e-4)
    save_file({k: v for k, v in list(lora.items())[1:]}, tmp_path / "partial.safetensors",
              metadata={"rank": "4", "alpha": "8.0"})
    with pytest.raises(ev.DataError, match="partial.safetensors: tensor layers.0"):
        ev.load_lora(create_model(cfg, seed=0), tmp_path / "partial.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ev.DataError, match="junk.safetensors: not a safetensors file"):
        ev.load_lora(create_model(cfg, seed=0), tmp_path / "junk.safetensors")
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
    assert "| model | Anatomy | MedQA | FiQA-SA (wF1) | Average |" in out
    assert "| base | 50.0 | 25.0 | 60.0 | 45.0 |" in out and "| cft | 60.0 | 25.0 | 30.0 | 38.3 |" in out
    assert "| task | base | cft | Δ cft − base |" in out
    assert "| Anatomy | 50.0 | 60.0 | +10.0 |" in out and "| FiQA-SA (wF1) | 60.0 | 30.0 | -30.0 |" in out
    assert "| Average | 45.0 | 38.3 | -6.7 |" in out


def test_cli_bad_inputs_exit_with_one_clear_line(tmp_path):
    (tmp_path / "bad.json").write_text("{}")
    (tmp_path / "taken.json").write_text("{}")
    cases = [(["--compare", str(tmp_path / "missing.json")], "missing.json: no such file"),
             (["--compare", str(tmp_path / "bad.json")], "bad.json: no 'tasks' object"),
             (["--tasks", "mmlu-medical,nope"], "unknown task 'nope'"),
             (["--limit", "0"], "--limit 0: expected an integer >= 1"),
             (["--out", str(tmp_path / "taken.json")], "taken.json exists; refusing to overwrite it"),
             (["--tasks", "medqa", "--data-dir", str(tmp_path), "--tokenizer", str(tmp_path / "none.model")],
              "none.model: no such file")]
    for argv, expected in cases:
        with pytest.raises(SystemExit) as e:
            ev.main(argv)
        assert str(e.value).startswith("error: ") and expected in str(e.value), argv
    assert (tmp_path / "taken.json").read_text() == "{}"


@needs_data
def test_cli_end_to_end_on_a_tiny_random_model(tmp_path):
    out = tmp_path / "r.json"
    ev.main(["--tasks", "mmlu-medical,fiqa-sa", "--shots", "0", "--limit", "1", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["tasks"]["mmlu-medical"]["n"] == 6 and len(r["tasks"]["mmlu-medical"]["subjects"]) == 6
    assert set(r["tasks"]["fiqa-sa"]) >= {"accuracy", "weighted_f1", "macro_f1", "n"}
    ev.main(["--suite", "icl", "--tasks", "fiqa-sa", "--limit", "1", "--out", str(tmp_path / "icl.json")])
    icl = json.loads((tmp_path / "icl.json").read_text())["tasks"]
    assert list(icl) == ["fiqa-sa k=0", "fiqa-sa k=1", "fiqa-sa k=4", "fiqa-sa k=8"]
    assert [icl[k]["shots"] for k in icl] == [0, 1, 4, 8] and all(icl[k]["n"] == 1 for k in icl)


@needs_data
def test_torchrun_ranks_give_the_single_process_predictions(tmp_path):
    argv = ["--tasks", "medqa,fiqa-sa", "--shots", "1", "--limit", "3"]
    ev.main(argv + ["--out", str(tmp_path / "one.json")])
    torchrun(ROOT / "evaluate.py", argv + ["--out", str(tmp_path / "two.json")], cwd=tmp_path)
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert two["world"] == 2
    for task in ("medqa", "fiqa-sa"):
        assert two["tasks"][task]["predictions"] == one["tasks"][task]["predictions"]
        assert two["tasks"][task]["n"] == 3
