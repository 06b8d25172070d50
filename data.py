"""Data for domain training: the tokenizer wrapper, contextual prompts, corpus readers (the project's one JSONL reader),
a tokenization cache, training rows (prompt + chunk, optional packing), instruction data and batches.

Read top to bottom: tokenizer -> prompts -> corpus readers -> tokenization cache -> training rows -> batches.
The built-in fictional domain is in pharmacology.py.
"""
import gzip
import hashlib
import json
import multiprocessing
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch

from atomic import atomic_write


class Tokenizer:
    """The project's one tokenizer interface: a sentencepiece tokenizer.model (Llama-2, the tiny test ones) or a
    Hugging Face tokenizer.json (Llama-3.x, read through the optional `tokenizers` package, imported only then).
    encode never adds BOS/EOS unless asked (a tokenizer.json's post-processor BOS is not applied)."""

    def __init__(self, path):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer {path}: no such file (expected a sentencepiece tokenizer.model or a "
                                    f"tokenizer.json)")
        self.path = str(path)
        self.sp = self.hf = None
        if path.suffix == ".json":
            self._load_tokenizer_json(path)
        else:
            self._load_sentencepiece(path)

    def _load_sentencepiece(self, path: Path):
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"tokenizer {path}: not a sentencepiece model ({e})") from None
        self.vocab_size = self.sp.vocab_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_id = max(self.sp.pad_id(), 0)  # Llama-2 defines no pad token: pad with 0 (<unk>), always masked

    def _load_tokenizer_json(self, path: Path):
        """BOS/EOS ids from config.json beside the file (bos_token_id, eos_token_id: the first of a list, i.e.
        end of text), else from tokenizer_config.json's bos_token/eos_token strings."""
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError:
            raise ValueError(f"tokenizer {path}: reading a tokenizer.json needs the `tokenizers` package "
                             f"(pip install tokenizers)") from None
        try:
            self.hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise ValueError(f"tokenizer {path}: not a Hugging Face tokenizer.json ({e})") from None
        self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)
        config, tokenizer_config = _json_object(path.parent / "config.json"), \
            _json_object(path.parent / "tokenizer_config.json")
        ids = {}
        for kind in ("bos", "eos", "pad"):
            value = config.get(f"{kind}_token_id")
            value = value[0] if isinstance(value, list) and value else value
            token = tokenizer_config.get(f"{kind}_token")
            token = token.get("content") if isinstance(token, dict) else token
            from_token = self.hf.token_to_id(token) if isinstance(token, str) else None
            ids[kind] = value if isinstance(value, int) and not isinstance(value, bool) else from_token
        for kind in ("bos", "eos"):
            if ids[kind] is None:
                raise ValueError(f"tokenizer {path}: no {kind.upper()} id (expected {kind}_token_id in config.json or "
                                 f"{kind}_token in tokenizer_config.json beside it)")
        self.bos_id, self.eos_id = ids["bos"], ids["eos"]
        self.pad_id = self.eos_id if ids["pad"] is None else ids["pad"]  # no pad token (Llama-3): any id, masked

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.EncodeAsIds(text) if self.sp else self.hf.encode(text, add_special_tokens=False).ids
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids) -> str:
        return self.sp.DecodeIds(list(ids)) if self.sp else self.hf.decode(list(ids))

    @classmethod
    def resolve(cls, tokenizer=None, checkpoint=None) -> "Tokenizer":
        """The one tokenizer rule of every script: --tokenizer FILE (or a folder holding one), else the checkpoint
        folder's tokenizer.model, else its tokenizer.json."""
        if tokenizer and not Path(tokenizer).is_dir():
            return cls(tokenizer)
        folder = tokenizer or checkpoint
        found = folder_tokenizer_file(folder)
        if found:
            return cls(found)
        where = f"{folder} has no tokenizer.model" if folder else "no checkpoint folder was given"
        raise ValueError(f"no tokenizer: {where}; pass --tokenizer FILE (a sentencepiece tokenizer.model or a "
                         f"Hugging Face tokenizer.json{'; the folder has no tokenizer.json either' if folder else ''})")

    def check_vocab(self, vocab_size: int) -> None:
        if self.vocab_size != vocab_size:
            raise ValueError(f"tokenizer {self.path} has {self.vocab_size} tokens but the model's vocabulary has "
                             f"{vocab_size}: they do not belong together")


def folder_tokenizer_file(folder) -> Path | None:
    """A model folder's tokenizer file: its tokenizer.model, else its tokenizer.json, else None (no folder: None)."""
    for name in ("tokenizer.model", "tokenizer.json"):
        if folder and (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def _json_object(path: Path) -> dict:
    """A JSON file's object, or {} when the file is absent or not a JSON object (optional metadata files)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


# ----------------------------------------------------------------------------------------------------------------------
# Contextual prompts (Choi et al., ICLR 2025, "Teaching LLMs How to Learn with Contextual Fine-Tuning").
# One prompt per category of the paper. Focus on Key Concepts, Comparative Learning and Application of Knowledge are
# the paper's wording; the other seven are written in the same register (second person, imperative, ~25 words).

CONTEXTUAL_PROMPTS = {
    "Application of Knowledge": "Think about practical applications of the information in the next text. How could "
                                "this knowledge be used in real-world situations?",
    "In-Depth Exploration": "Explore the following text in depth. Ask yourself why each statement holds and how the "
                            "details fit together into a complete picture.",
    "Reflective Thinking": "As you read the next passage, reflect on how it relates to what you already know and how "
                           "it changes or deepens your understanding of the subject.",
    "Creative Interpretation": "Read the following text with an open and creative mind. Imagine how its ideas could be "
                               "explained to someone else or extended in new directions.",
    "Summarization and Synthesis": "While reading the next text, summarize its main points in your own words and "
                                   "synthesize them into a short, coherent account of the topic.",
    "Focus on Key Concepts": "Concentrate on understanding the core principles and essential facts in the following "
                             "text. Pay special attention to definitions, examples, and conclusions.",
    "Contextual Understanding": "Consider the broader context of the upcoming information. Think about where it fits "
                                "within the field and why it matters for the overall subject.",
    "Critical Analysis": "Critically analyze the following text. Evaluate the evidence behind each claim and note its "
                         "strengths, its limitations, and its implications.",
    "Question-Based Learning": "Before reading the next text, ask yourself what questions it might answer. As you read, "
                               "look for the answers and note which facts support them.",
    "Comparative Learning": "Compare and contrast the upcoming information with what you have learned in similar topics. "
                            "Look for differences, similarities, and connections.",
}

# NEG-CFT baseline: the same number, length and imperative form, but no guidance on how to learn the text.
NEGATIVE_PROMPTS = [
    "Look at the layout of the following text. Notice how many lines it has and where each paragraph begins and ends.",
    "The next passage is printed in a standard font. Pay attention to the spacing between the words and the margins.",
    "Count the number of sentences in the upcoming text while you read it, and keep the running total in mind.",
    "Read the following text at an even pace. Try to keep the same reading speed from the first word to the last.",
    "Notice which letters appear most often in the next passage. Pay special attention to the vowels and to capitals.",
    "The following text is one of many documents in this collection. It was selected for this position by its index.",
    "Before reading the next text, sit comfortably and adjust the brightness of your screen to a pleasant level.",
    "Observe the punctuation marks in the upcoming passage. Note where the commas, periods, and parentheses are placed.",
    "The next text was stored as a plain file. Think about the number of characters it takes up on the disk.",
    "Scan the following text from top to bottom. Pay attention to the length of its words, not to what they say.",
]


def load_prompts(path) -> list[str]:
    """A user's prompt set: a JSON list of strings, or one prompt per line (blank lines ignored)."""
    path = Path(path)
    text, utf8 = _read_text_file(path)
    if not utf8:
        raise ValueError(f"{path}: not UTF-8 text (expected a JSON list of strings or one prompt per line)")
    if text.lstrip().startswith("["):
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a valid JSON list of prompts ({e})") from None
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"{path}: expected a JSON list of strings")
    else:
        prompts = text.splitlines()
    prompts = [p.strip() for p in prompts if p.strip()]
    if not prompts:
        raise ValueError(f"{path}: no prompts found (expected a JSON list of strings or one prompt per line)")
    return prompts


# ----------------------------------------------------------------------------------------------------------------------
# Corpus readers: JSONL (one document per line, text under a configurable field) or plain text (one document per
# file), a single file or a folder of them, gzip read transparently. Lines or files with bytes that are not UTF-8 are
# skipped and counted rather than stopping a long run; structural errors (a line that is not JSON, a missing field)
# stop with the file and line number, because they usually mean a wrong --text-field or a wrong file.

CORPUS_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".txt", ".txt.gz")


@dataclass
class CorpusStats:
    files: int = 0
    documents: int = 0
    skipped_non_utf8: int = 0  # JSONL lines / text files with invalid UTF-8
    skipped_empty: int = 0  # documents whose text is empty or whitespace

    def summary(self) -> str:
        return (f"{self.documents} documents from {self.files} files; skipped {self.skipped_non_utf8} non-UTF-8 "
                f"and {self.skipped_empty} empty")


def open_bytes(path: Path):
    """A file opened for bytes, gunzipped on the fly when its name ends in .gz."""
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _read_text_file(path: Path) -> tuple[str, bool]:
    """(text, ok): ok is False when the bytes are not UTF-8."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with open_bytes(path) as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # a truncated or corrupt .gz
        raise ValueError(f"{path}: unreadable ({e})") from None
    try:
        return raw.decode("utf-8"), True
    except UnicodeDecodeError:
        return "", False


def corpus_files(path) -> list[Path]:
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(CORPUS_SUFFIXES))
    if not files:
        raise ValueError(f"{path}: no corpus files (expected names ending in {', '.join(CORPUS_SUFFIXES)})")
    return files


def read_jsonl(path, stats: CorpusStats | None = None):
    """Yield (line_number, object) for each non-blank line of a JSON-lines file (gzip if it ends in .gz): the project's
    one JSONL reader. Errors name the place as `path:line: message`. A line whose bytes are not UTF-8 is counted in
    `stats` and skipped (a long corpus should not stop on one bad line), or, without stats, is an error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    line_no = 0
    try:
        with open_bytes(path) as f:
            for line_no, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    if stats is None:
                        raise ValueError(f"{path}:{line_no}: not UTF-8 text ({e.reason})") from None
                    stats.skipped_non_utf8 += 1
                    continue
                if not line.strip():
                    continue
                try:
                    yield line_no, json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
    except (OSError, EOFError) as e:  # a truncated or corrupt .gz
        raise ValueError(f"{path}:{line_no + 1}: unreadable ({e})") from None


def _is_json_lines(path: Path) -> bool:
    """Whether a .json file is JSON lines: its first line is a whole JSON value and another line follows."""
    try:
        with open_bytes(path) as f:
            json.loads(f.readline())
            return any(line.strip() for line in f)
    except (ValueError, OSError, EOFError):  # not one value per line, or unreadable (reported by the caller)
        return False


def read_json_records(path, stats: CorpusStats | None = None):
    """Yield (where, record) from a .json file holding a list of records, an object of records keyed by id (as
    PubMedQA's ori_pqal.json) or one record; `where` is "path: record KEY" for error messages. A JSON-lines file
    named .json (many are) is read by read_jsonl, with "path:line" places."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if _is_json_lines(path):
        yield from ((f"{path}:{line_no}", obj) for line_no, obj in read_jsonl(path, stats))
        return
    try:
        with open_bytes(path) as f:
            value = json.loads(f.read().decode("utf-8"))
    except (OSError, EOFError) as e:  # a truncated or corrupt .gz
        raise ValueError(f"{path}: unreadable ({e})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
        records = value.items()
    elif isinstance(value, (dict, list)):
        records = [(0, value)] if isinstance(value, dict) else enumerate(value)
    else:
        raise ValueError(f"{path}: expected a list of records or an object of records, found {type(value).__name__}")
    for key, record in records:
        yield f"{path}: record {key!r}" if isinstance(key, str) else f"{path}: record {key}", record


def corpus_records(path, stats: CorpusStats | None = None):
    """(where, record) of a JSON-lines or JSON corpus file, through read_jsonl or read_json_records by its name."""
    if Path(path).name.endswith((".json", ".json.gz")):
        return read_json_records(path, stats)
    return ((f"{path}:{line_no}", obj) for line_no, obj in read_jsonl(path, stats))


def record_text(record, text_field: str, where: str) -> str:
    """A record's document text. text_field names one field or several separated by commas (PubMedQA:
    "CONTEXTS,LONG_ANSWER"); each holds a string or a list of strings, joined by newlines."""
    parts = []
    for name in (n.strip() for n in text_field.split(",")):
        value = require_field(record, name, where, kind=object, hint="; set the field name with --text-field")
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            value = "\n".join(value)
        if not isinstance(value, str):
            raise ValueError(f"{where}: field '{name}' is {type(value).__name__}, expected str or a list of str")
        parts.append(value)
    return "\n".join(parts)


def read_corpus(path, text_field: str = "text") -> tuple[list[str], CorpusStats]:
    """All documents under `path`, in a fixed order (sorted file names, then line / record order)."""
    stats = CorpusStats()
    texts = []
    for file in corpus_files(path):
        stats.files += 1
        if file.name.endswith((".txt", ".txt.gz")):
            text, ok = _read_text_file(file)
            stats.skipped_non_utf8 += not ok
            documents = [text] if ok else []
        else:
            documents = (record_text(obj, text_field, where) for where, obj in corpus_records(file, stats))
        for text in documents:
            if text.strip():
                texts.append(text)
            else:
                stats.skipped_empty += 1
    stats.documents = len(texts)
    if not texts:
        raise ValueError(f"{path}: empty corpus ({stats.summary()})")
    return texts, stats


def require_field(obj, name: str, where: str, kind=str, hint: str = ""):
    """obj[name], checked to be a `kind`; else one error naming the place (`path:line`), the field and what was found."""
    if not isinstance(obj, dict) or name not in obj:
        keys = ", ".join(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{where}: no field '{name}' (found: {keys}){hint}")
    if not isinstance(obj[name], kind):
        raise ValueError(f"{where}: field '{name}' is {type(obj[name]).__name__}, expected {kind.__name__}")
    return obj[name]


def read_instructions(path, prompt_field: str = "prompt", response_field: str = "response") -> list[tuple[str, str]]:
    """Instruction data: records (JSONL lines, or a .json list) with a prompt and a response (the prompt carries its
    own template, if any)."""
    stats = CorpusStats()
    pairs = []
    for file in corpus_files(path):
        for where, obj in corpus_records(file, stats):
            pairs.append((require_field(obj, prompt_field, where), require_field(obj, response_field, where)))
    if not pairs:
        raise ValueError(f"{path}: no instruction examples")
    if stats.skipped_non_utf8:
        print(f"warning: {path}: skipped {stats.skipped_non_utf8} non-UTF-8 lines", file=sys.stderr)
    return pairs


def train_tokenizer(texts: list[str], path, vocab_size: int) -> Path:
    """Train a small sentencepiece BPE model on `texts` with Llama-2's special ids (unk 0, bos 1, eos 2, no pad) and
    byte fallback (any text encodes). For the built-in domain and tests; real runs use the checkpoint's tokenizer."""
    import io
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=buffer, vocab_size=vocab_size,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1, byte_fallback=True,
                                   character_coverage=1.0, minloglevel=2)
    path = Path(path)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Tokenization, parallel over processes and cached on disk: the cache key hashes the tokenizer file and every text,
# so a changed corpus or tokenizer never reuses stale tokens, and a 300k-document corpus is tokenized once.

_worker_tokenizer = None


def _init_worker(tokenizer_path):
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(tokenizer_path)


def _encode_batch(texts):
    return [np.asarray(_worker_tokenizer.encode(t), dtype=np.int32) for t in texts]


def corpus_key(texts, tokenizer_path) -> str:
    h = hashlib.sha256(Path(tokenizer_path).read_bytes())
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:20]


def tokenize_texts(texts: list[str], tokenizer_path, cache_dir=None, workers: int | None = None,
                   progress: bool = True) -> list[np.ndarray]:
    """Token ids (no BOS/EOS) of each text. With cache_dir, a second call with the same texts and tokenizer is a
    file read. Under torchrun let one rank fill the cache first (see cft.py) so ranks don't tokenize in parallel."""
    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"tokens-{corpus_key(texts, tokenizer_path)}.npz"
        if cache.is_file():
            with np.load(cache) as f:
                return np.split(f["flat"], f["offsets"][1:-1])
    workers = workers or min(len(texts) // 256 + 1, os.cpu_count() or 1)
    batches = [texts[i:i + 256] for i in range(0, len(texts), 256)]
    from tqdm import tqdm
    bar = tqdm(total=len(texts), desc="tokenizing", unit="doc", disable=not progress or len(texts) < 1000)
    tokens = []
    if workers <= 1:
        _init_worker(tokenizer_path)
        for b in batches:
            tokens.extend(_encode_batch(b))
            bar.update(len(b))
    else:
        # fork: workers inherit the imported modules; each loads the sentencepiece model once.
        with multiprocessing.get_context("fork").Pool(workers, _init_worker, (str(tokenizer_path),)) as pool:
            for out in pool.imap(_encode_batch, batches):
                tokens.extend(out)
                bar.update(len(out))
    bar.close()
    if cache is not None:
        offsets = np.cumsum([0] + [len(t) for t in tokens])
        flat = np.concatenate(tokens) if tokens else np.zeros(0, np.int32)
        atomic_write(cache, lambda f: np.savez(f, flat=flat, offsets=offsets))
    return tokens


# ----------------------------------------------------------------------------------------------------------------------
# Training rows. An example is BOS + contextual prompt + text (+ EOS) with loss only on the text and EOS, i.e. the
# CFT objective -sum_k log P(x_k | c, x_<k) (Choi et al., eq. 2). A document longer than the sequence is cut into
# chunks and every chunk gets its own freshly sampled prompt, so the model never sees domain text without one.
# Rows hold seq_len + 1 tokens so that inputs (row[:-1]) and next-token targets (row[1:]) are both seq_len long.
# SOFT (-1) marks a slot whose input embedding is replaced by a trained soft prompt (ProMoT); it is never a target.

SOFT = -1


@dataclass
class TrainingExample:
    tokens: np.ndarray  # (L,) int32
    loss: np.ndarray  # (L,) bool: this token is a training target


def document_examples(doc: np.ndarray, prompts: list[list[int]], row_len: int, bos_id: int, eos_id: int | None,
                      rng: np.random.Generator, n_soft: int = 0) -> list[TrainingExample]:
    """Chunks of one tokenized document, each [SOFT]*n_soft + BOS + prompt + chunk, at most row_len tokens.
    `prompts` is sampled per chunk (a single [] entry gives CPT; a single entry gives auto-CFT's per-document prompt)."""
    stream = np.append(doc, eos_id).astype(np.int32) if eos_id is not None else np.asarray(doc, np.int32)
    examples, pos = [], 0
    while pos < len(stream):
        prompt = prompts[rng.integers(len(prompts))] if len(prompts) > 1 else prompts[0]
        head = [SOFT] * n_soft + [bos_id] + list(prompt)
        room = row_len - len(head)
        if room < 1:
            raise ValueError(f"a prompt of {len(prompt)} tokens leaves no room for text in a row of {row_len} tokens; "
                             f"raise --seq-len or shorten the prompts")
        chunk = stream[pos:pos + room]
        pos += room
        tokens = np.concatenate([np.asarray(head, np.int32), chunk])
        loss = np.zeros(len(tokens), bool)
        loss[len(head):] = True
        examples.append(TrainingExample(tokens, loss))
    return examples


def instruction_example(prompt: list[int], response: list[int], bos_id: int, eos_id: int | None,
                        n_soft: int = 0) -> TrainingExample:
    """[SOFT]*n_soft + BOS + prompt + response + EOS, loss on the response and EOS only."""
    head = [SOFT] * n_soft + [bos_id] + list(prompt)
    tail = list(response) + ([eos_id] if eos_id is not None else [])
    loss = np.zeros(len(head) + len(tail), bool)
    loss[len(head):] = True
    return TrainingExample(np.asarray(head + tail, np.int32), loss)


@dataclass
class Rows:
    """N training rows of row_len tokens. doc_ids is None unless packed; padding has loss False."""
    tokens: np.ndarray  # (N, row_len) int32
    loss: np.ndarray  # (N, row_len) bool
    doc_ids: np.ndarray | None  # (N, row_len) int16: document number within the row (packing)

    def __len__(self):
        return len(self.tokens)

    @staticmethod
    def concat(parts: list["Rows"]) -> "Rows":
        parts = [p for p in parts if len(p)]
        doc_ids = None
        if any(p.doc_ids is not None for p in parts):
            # An unpacked row is one document then right padding, which only padding queries can see: all id 0.
            doc_ids = np.concatenate([p.doc_ids if p.doc_ids is not None else np.zeros(p.tokens.shape, np.int16)
                                      for p in parts])
        return Rows(np.concatenate([p.tokens for p in parts]), np.concatenate([p.loss for p in parts]), doc_ids)

    def take(self, index) -> "Rows":
        return Rows(self.tokens[index], self.loss[index], None if self.doc_ids is None else self.doc_ids[index])


def make_rows(examples: list[TrainingExample], row_len: int, pad_id: int, pack: bool) -> Rows:
    """One example per row (right-padded), or with pack=True greedily fill rows with consecutive examples and record
    which document each position belongs to, so the attention mask can stop attention across documents."""
    groups = []
    for ex in examples:
        if len(ex.tokens) > row_len:
            raise ValueError(f"example of {len(ex.tokens)} tokens does not fit a row of {row_len}")
        if pack and groups and sum(len(e.tokens) for e in groups[-1]) + len(ex.tokens) <= row_len:
            groups[-1].append(ex)
        else:
            groups.append([ex])
    tokens = np.full((len(groups), row_len), pad_id, np.int32)
    loss = np.zeros((len(groups), row_len), bool)
    doc_ids = np.zeros((len(groups), row_len), np.int16) if pack else None
    for r, group in enumerate(groups):
        pos = 0
        for d, ex in enumerate(group):
            tokens[r, pos:pos + len(ex.tokens)] = ex.tokens
            loss[r, pos:pos + len(ex.tokens)] = ex.loss
            if pack:
                doc_ids[r, pos:pos + len(ex.tokens)] = d
            pos += len(ex.tokens)
        if pack:
            doc_ids[r, pos:] = len(group)  # padding: its own "document"
    return Rows(tokens, loss, doc_ids)


def domain_rows(docs: list[np.ndarray], prompts: list[list[int]], seq_len: int, bos_id: int, eos_id: int | None,
                pad_id: int, seed: int, pack: bool, doc_prompts: list[list[int]] | None = None,
                n_soft: int = 0) -> Rows:
    """Rows for a tokenized corpus. The prompt of every chunk is drawn from a generator seeded with `seed`, so all ranks
    and a resumed run build identical rows. doc_prompts (auto-CFT) gives each document its own prompt instead."""
    rng = np.random.default_rng(seed)
    examples = []
    for i, doc in enumerate(docs):
        own = [doc_prompts[i]] if doc_prompts is not None else prompts
        examples.extend(document_examples(doc, own, seq_len + 1, bos_id, eos_id, rng, n_soft))
    return make_rows(examples, seq_len + 1, pad_id, pack)


def mix_rows(main: Rows, extra: Rows, ratio: float, seed: int) -> Rows:
    """Append rows of `extra` so that they make up `ratio` of the result (cycled through in a seeded order when
    there are too few). The sampler shuffles the union, so the mix is uniform over training."""
    if not 0 < ratio < 1:
        raise ValueError(f"mix ratio must be in (0, 1), got {ratio}")
    n = round(ratio / (1 - ratio) * len(main))
    order = np.random.default_rng(seed).permutation(len(extra))
    return Rows.concat([main, extra.take(order[np.arange(n) % len(extra)])])


# ----------------------------------------------------------------------------------------------------------------------
# Batches. The sampler fixes the order of a whole epoch from (seed, epoch), so every rank knows every global batch;
# rank r takes its contiguous share. Thus N processes see exactly the global batches that one process would, and a
# resumed run continues from (epoch, step) without any saved iterator state.


class GlobalBatchSampler:
    def __init__(self, segments: list[int], global_batch: int, seed: int):
        """segments: row counts of consecutive stages (e.g. [domain rows, instruction rows] for a second stage);
        each stage is shuffled within itself and the stages run in order."""
        self.segments, self.global_batch, self.seed = segments, global_batch, seed
        self.epoch = 0
        if sum(segments) < global_batch:
            raise ValueError(f"only {sum(segments)} training rows for a global batch of {global_batch}; "
                             f"lower --batch-size or add data")

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):  # optimiser steps per epoch; the last incomplete batch is dropped
        return sum(self.segments) // self.global_batch

    def order(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch])
        starts = np.cumsum([0] + self.segments)
        return np.concatenate([s + rng.permutation(n) for s, n in zip(starts, self.segments)])

    def batch(self, step: int, rank: int = 0, world: int = 1, order: np.ndarray | None = None) -> np.ndarray:
        """Row indices of this rank's share of global batch `step` (within the epoch)."""
        order = self.order() if order is None else order
        rows = order[step * self.global_batch:(step + 1) * self.global_batch]
        per_rank = self.global_batch // world
        return rows[rank * per_rank:(rank + 1) * per_rank]


def to_batch(rows: Rows, index, device) -> dict:
    """Model inputs for rows[index]: tokens (B, T), targets (B, T) with -100 where no loss, soft (B, T) bool or None,
    doc_ids (B, T) or None."""
    tokens = torch.from_numpy(rows.tokens[index]).long()
    loss = torch.from_numpy(rows.loss[index])
    targets = torch.where(loss[:, 1:], tokens[:, 1:], -100)
    inputs = tokens[:, :-1]
    soft = inputs == SOFT
    batch = {"tokens": inputs.clamp(min=0), "targets": targets, "soft": soft if soft.any() else None,
             "doc_ids": None if rows.doc_ids is None else torch.from_numpy(rows.doc_ids[index][:, :-1]).long()}
    return {k: v if v is None else v.to(device, non_blocking=True) for k, v in batch.items()}
