"""Shared test fixtures: tiny configs and a tiny sentencepiece tokenizer trained on generated text."""
import io
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model import ModelConfig  # noqa: E402

SHARED_DATA = ROOT.parent / "shared" / "data"
LLAMA_TOKENIZER = SHARED_DATA / "llama2-tokenizer" / "tokenizer.model"
needs_data = pytest.mark.skipif(not (SHARED_DATA / "mmlu-medical").is_dir() or not LLAMA_TOKENIZER.is_file(),
                                reason="../shared/data not present")

torch.set_num_threads(2)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def one_thread():
    """For tiny models: one intra-op thread is faster than two (synthetic.py's CLI does the same on CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_cfg(vocab_size: int = 512, **overrides) -> ModelConfig:
    """A model small enough for exact CPU tests: grouped-query attention (4 heads, 2 KV heads)."""
    fields = dict(vocab_size=vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=512)
    return ModelConfig(**{**fields, **overrides})


def torchrun(script: Path, argv: list[str], cwd: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    """Run an entry file under torchrun (gloo, one thread per process, a free port); require exit status 0."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(script), *argv]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            cwd=cwd, timeout=300)
    assert result.returncode == 0, result.stderr[:4000] + "\n...\n" + result.stderr[-2000:]
    return result


def _generated_sentences(n: int, seed: int = 0):
    rng = random.Random(seed)
    subjects = ["the patient", "a doctor", "the drug", "this trial", "the market", "a company", "the model", "we"]
    verbs = ["reduced", "increased", "treated", "reported", "showed", "improved", "caused", "measured"]
    objects = ["blood pressure", "the dose", "revenue", "side effects", "the risk", "inflammation", "profits", "pain"]
    tails = ["in two weeks.", "after treatment.", "by ten percent.", "in the first quarter.", "without harm.", "."]
    for _ in range(n):
        yield " ".join([rng.choice(subjects).capitalize(), rng.choice(verbs), rng.choice(objects), rng.choice(tails)])


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> str:
    """A sentencepiece model with 512 pieces, trained in about a second."""
    import sentencepiece as spm
    out = tmp_path_factory.mktemp("tokenizer") / "tokenizer.model"
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=_generated_sentences(3000), model_writer=buffer, vocab_size=512,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   byte_fallback=True, minloglevel=2)
    out.write_bytes(buffer.getvalue())
    return str(out)


def tiny_run_inputs(root: Path, tokenizer_path: str, n_docs: int, sentences_cycle: int = 7) -> Path:
    """Under root: ckpt/ (a tiny random Hugging Face Llama with the test tokenizer) and corpus.jsonl (n_docs
    documents of generated sentences): the inputs of the cft.py tests."""
    import json
    import shutil
    from hf_checkpoint import save_pretrained
    from model import create_model
    save_pretrained(create_model(tiny_cfg(512), seed=0), root / "ckpt")
    shutil.copy(tokenizer_path, root / "ckpt" / "tokenizer.model")
    lines = [json.dumps({"text": " ".join(_generated_sentences(3 + i % sentences_cycle, seed=i))})
             for i in range(n_docs)]
    (root / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    return root


def cft_argv(root: Path, out: Path, train: list[str], *extra) -> list[str]:
    """cft.py's arguments for a run on tiny_run_inputs(root) into `out`."""
    return ["--checkpoint", str(root / "ckpt"), "--data", str(root / "corpus.jsonl"), "--out", str(out),
            "--cache-dir", str(root / "cache"), *train, *extra]


def printed_by(main, argv) -> str:
    """What main(argv) prints on stdout."""
    import contextlib
    import io
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main(argv)
    return printed.getvalue()
