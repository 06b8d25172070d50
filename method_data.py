"""The rows each cft.py method trains on: corpus -> token ids (cached) -> rows with the method's prompts (CFT's
contextual prompts, none for CPT, NEG-CFT's, auto-CFT's model-written ones), a held-out split of the documents, general
text mixed in, instruction data mixed in or as a second stage, ProMoT's soft-prompt slots and 1-shot examples.

Every rank builds the same rows (seeded), and the batch sampler gives each rank its share of every global batch. The
input files are read once, before anything is written (read_extra_inputs), so bad input stops the run at once.
Errors are one-line ValueErrors naming the flag and file.
"""
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import data
from auto_cft import auto_prompts
from data import Rows, Tokenizer
from promot import document_shots, instruction_shots, with_shots
from run_folder import data_fingerprint


def read_input(flag: str, path, reader, *args):
    """reader(path, *args), with an unreadable file (missing, a truncated or non-gzip .gz, no permission) as one
    ValueError naming the flag."""
    try:
        return reader(path, *args)
    except FileNotFoundError as e:
        raise ValueError(f"{flag}: " + (f"{e.filename}: {e.strerror}" if e.filename else str(e))) from None
    except (OSError, EOFError) as e:
        raise ValueError(f"{flag} {path}: unreadable ({e.strerror or e})") from None


@dataclass
class ExtraInputs:
    prompts: list[str] | None = None  # --prompts
    instructions: list[tuple[str, str]] | None = None  # --instruct-data
    general: list[str] | None = None  # --general-data


def read_extra_inputs(cfg) -> ExtraInputs:
    """--prompts, --instruct-data and --general-data, read and checked before the run writes anything."""
    return ExtraInputs(
        prompts=read_input("--prompts", cfg.prompts, data.load_prompts) if cfg.prompts else None,
        instructions=read_input("--instruct-data", cfg.instruct_data, data.read_instructions)
        if cfg.instruct_data else None,
        general=read_input("--general-data", cfg.general_data, data.read_corpus, cfg.text_field)[0]
        if cfg.general_data else None)


@dataclass
class TrainData:
    rows: Rows
    segments: list[int]  # row counts of the stages (domain [+ instruction second stage])
    heldout: Rows | None
    docs: list[np.ndarray] | None = None  # the training documents' token ids (ProMoT's vocabulary initialisation)
    info: dict | None = None  # {"documents", "rows", "fingerprint"}: stored in checkpoints, checked on --resume


def method_prompts(method: str, tokenizer: Tokenizer, prompts_file: str | None,
                   prompt_texts: list[str] | None = None) -> list[list[int]]:
    if method == "cpt":
        return [[]]
    if method == "neg-cft":
        return [tokenizer.encode(t) for t in data.NEGATIVE_PROMPTS]
    if prompt_texts is None:
        prompt_texts = data.load_prompts(prompts_file) if prompts_file else list(data.CONTEXTUAL_PROMPTS.values())
    return [tokenizer.encode(t) for t in prompt_texts]


def tokenize_documents(texts, tokenizer, cfg, env):
    """Token ids of texts; on a single rank first so the cache is filled once and the other ranks read it."""
    try:
        if env.is_main:
            tokens = data.tokenize_texts(texts, tokenizer.path, cfg.cache_dir, cfg.workers, cfg.progress)
        env.barrier()
        if not env.is_main:
            tokens = data.tokenize_texts(texts, tokenizer.path, cfg.cache_dir, cfg.workers, progress=False)
    except (ValueError, OSError, EOFError, KeyError) as e:  # a damaged cache file (np.load never unpickles)
        raise ValueError(f"--cache-dir {cfg.cache_dir}: a tokenization cache file is damaged ({e}); remove "
                         f"{Path(cfg.cache_dir) / 'tokens-*.npz'}") from None
    return tokens


def prepare_data(cfg, method: str, texts: list[str], tokenizer: Tokenizer, lm, env, n_soft: int,
                 extra: ExtraInputs | None = None) -> TrainData:
    extra = extra if extra is not None else read_extra_inputs(cfg)
    docs = tokenize_documents(texts, tokenizer, cfg, env)
    # Held-out documents: a seeded choice, never trained on; their loss is measured with the method's own prompts.
    n_heldout = int(len(docs) * cfg.heldout_fraction)
    order = np.random.default_rng([cfg.seed, 7]).permutation(len(docs))
    heldout_ids, train_ids = order[:n_heldout], np.sort(order[n_heldout:])
    prompts = method_prompts("cft" if method == "auto-cft" else method, tokenizer, cfg.prompts, extra.prompts)
    doc_prompts = auto_prompts(lm, tokenizer, texts, cfg, env) if method == "auto-cft" else None
    shots = document_shots([docs[i] for i in train_ids], tokenizer, cfg.seed) if cfg.promot_one_shot else None
    if shots:
        prompts = with_shots(prompts, shots)
        if doc_prompts is not None:  # one fixed example per document, in front of its own prompt
            doc_prompts = [shots[i % len(shots)] + p for i, p in enumerate(doc_prompts)]
    common = dict(seq_len=cfg.seq_len, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                  pack=cfg.pack, n_soft=n_soft)
    pick = lambda ids, xs: None if xs is None else [xs[i] for i in ids]
    rows = data.domain_rows([docs[i] for i in train_ids], prompts, seed=cfg.seed,
                            doc_prompts=pick(train_ids, doc_prompts), **common)
    heldout = data.domain_rows([docs[i] for i in heldout_ids], prompts, seed=cfg.seed + 1,
                               doc_prompts=pick(heldout_ids, doc_prompts), **common) if n_heldout else None
    if extra.general:
        general = tokenize_documents(extra.general, tokenizer, cfg, env)
        general_rows = data.domain_rows(general, [[]], seed=cfg.seed + 2, **common)
        rows = data.mix_rows(rows, general_rows, cfg.general_ratio, cfg.seed)
    segments = [len(rows)]
    if extra.instructions:
        instruct = instruction_rows(cfg, extra.instructions, tokenizer, env, n_soft)
        if cfg.instruct_ratio > 0:
            rows = data.mix_rows(rows, instruct, cfg.instruct_ratio, cfg.seed + 3)
            segments = [len(rows)]
        else:  # second stage: all instruction rows after the domain rows
            rows = Rows.concat([rows, instruct])
            segments = [segments[0], len(instruct)]
    info = {"documents": len(train_ids), "rows": len(rows),
            "fingerprint": data_fingerprint(rows.tokens, rows.loss, np.zeros(0) if rows.doc_ids is None
                                            else rows.doc_ids, np.asarray(segments), heldout_ids)}
    return TrainData(rows, segments, heldout, [docs[i] for i in train_ids], info)


def instruction_rows(cfg, pairs: list[tuple[str, str]], tokenizer: Tokenizer, env, n_soft: int) -> Rows:
    """Instruction examples as rows: loss on the response only; examples longer than a row are skipped (with a
    warning). ProMoT + 1-shot: another whole example in front of each prompt."""
    shots = instruction_shots(pairs, tokenizer, cfg.seed) if cfg.promot_one_shot else {}

    def shot(i):  # another example than the input itself
        others = [tokens for j, tokens in shots.items() if j != i]
        return others[i % len(others)] if others else []
    examples = [data.instruction_example(shot(i) + tokenizer.encode(p), tokenizer.encode(r), tokenizer.bos_id,
                                         tokenizer.eos_id, n_soft) for i, (p, r) in enumerate(pairs)]
    fits = [e for e in examples if len(e.tokens) <= cfg.seq_len + 1]
    if len(fits) < len(examples) and env.is_main:
        print(f"warning: {cfg.instruct_data}: skipped {len(examples) - len(fits)} instruction examples longer "
              f"than --seq-len {cfg.seq_len}", file=sys.stderr)
    if not fits:
        raise ValueError(f"--instruct-data {cfg.instruct_data}: no instruction example fits --seq-len {cfg.seq_len}")
    return data.make_rows(fits, cfg.seq_len + 1, tokenizer.pad_id, cfg.pack)
