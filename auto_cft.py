"""auto-CFT: the model writes one contextual prompt per document (greedy, batched), cached on disk.

Ranks split the documents; generation runs a fixed number of tokens (no early stop) so that FSDP ranks stay in
lockstep, and every rank ends with every prompt. The prompt is cut at the first end-of-sequence or line end.
"""
import json
import math
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
from atomic import write_text
from distributed import reshard
from model import PRECISIONS, generate

AUTO_CFT_INSTRUCTION = ("Given the following text, generate a contextual prompt that encourages a reader to focus on "
                        "the main ideas and themes presented. The contextual prompt should be concise and help the "
                        "reader engage deeply with the content.")


def auto_prompts(lm, tokenizer, texts: list[str], cfg, env, batch_size: int = 16,
                 excerpt_tokens: int = 512) -> list[list[int]]:
    """One prompt (token ids) per text, written by `lm` (cft.LanguageModel, its soft prompt unused); cached in
    cfg.cache_dir by texts, model, seed and length."""
    key = data.corpus_key(texts + [str(cfg.checkpoint), str(cfg.model), str(cfg.seed), str(cfg.auto_prompt_tokens)],
                          tokenizer.path)
    cache = Path(cfg.cache_dir) / f"auto-prompts-{key}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    head = tokenizer.encode(AUTO_CFT_INSTRUCTION + "\n\nText:", bos=True)
    tail = tokenizer.encode("\n\nContextual prompt:")
    inputs = [head + tokenizer.encode(t)[:excerpt_tokens] + tail for t in texts]
    mine = list(range(env.rank, len(texts), env.world))
    n_batches = math.ceil(math.ceil(len(texts) / env.world) / batch_size)
    newline = {i for i in tokenizer.encode("a\nb") if "\n" in tokenizer.decode([i])}  # a prompt ends at a line end
    results = {}
    lm.eval()
    for b in tqdm(range(n_batches), desc="auto-cft prompts", disable=not (env.is_main and cfg.progress)):
        # A rank out of documents generates for document 0 and keeps nothing: FSDP needs every rank's forwards.
        part = mine[b * batch_size:(b + 1) * batch_size]
        # Autocast also under FSDP: generate's KV cache takes the dtype of the (fp32, sharded) parameters while
        # FSDP computes in bf16; autocast makes attention read both in bf16.
        with torch.autocast(env.device.type, dtype=PRECISIONS[cfg.precision], enabled=cfg.precision != "fp32"):
            out = generate(lm, [inputs[i] for i in part or [0]], cfg.auto_prompt_tokens, pad_id=tokenizer.pad_id)
        for i, ids in zip(part, out):
            cut = next((k for k, t in enumerate(ids) if t == tokenizer.eos_id or t in newline), len(ids))
            results[i] = ids[:cut]
    lm.train()
    reshard(lm)
    if env.world > 1:
        results = _share_prompts(results, len(texts), cfg.auto_prompt_tokens, env)
    prompts = [results[i] for i in range(len(texts))]
    if env.is_main:
        write_text(cache, json.dumps(prompts))
    return prompts


def _share_prompts(results: dict, n: int, length: int, env) -> dict:
    """Every rank gets every prompt: rows of -1 after a prompt's end, each filled on one rank only, max-reduced."""
    table = torch.full((n, length), -1, dtype=torch.long)
    for i, ids in results.items():
        table[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    table = table.to(env.device)
    dist.all_reduce(table, op=dist.ReduceOp.MAX)
    return {i: [t for t in row if t >= 0] for i, row in enumerate(table.tolist())}
