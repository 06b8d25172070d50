"""data.py: prompts, corpus readers, tokenization cache, prompt + chunk rows, packing, sampler, tokenizer rule."""
import gzip
import json

import numpy as np
import pytest
import torch

import data
from conftest import tiny_cfg
from model import AttentionMask, create_model

BOS, EOS, PAD = 1, 2, 0
PROMPTS = [[10, 11, 12], [20, 21], [30, 31, 32, 33]]


def test_prompt_sets_have_ten_categories_and_the_papers_wording():
    assert len(data.CONTEXTUAL_PROMPTS) == 10 and len(data.NEGATIVE_PROMPTS) == 10
    assert data.CONTEXTUAL_PROMPTS["Focus on Key Concepts"].startswith("Concentrate on understanding the core")
    assert len(set(data.NEGATIVE_PROMPTS)) == 10


def test_load_prompts_json_lines_and_errors(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(["Read closely.", "Think."]))
    (tmp_path / "b.txt").write_text("Read closely.\n\nThink.\n")
    assert data.load_prompts(tmp_path / "a.json") == data.load_prompts(tmp_path / "b.txt") == ["Read closely.", "Think."]
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="no prompts"):
        data.load_prompts(tmp_path / "empty.txt")


def test_every_chunk_of_a_long_document_starts_with_its_own_prompt():
    doc = np.arange(100, 600, dtype=np.int32)  # 500 tokens, rows of 65
    examples = data.document_examples(doc, PROMPTS, 65, BOS, EOS, np.random.default_rng(0))
    assert len(examples) > 8
    text = []
    used = set()
    for ex in examples:
        assert len(ex.tokens) <= 65 and ex.tokens[0] == BOS
        prompt = next(p for p in PROMPTS if list(ex.tokens[1:1 + len(p)]) == p)  # raises if none matches
        used.add(tuple(prompt))
        head = 1 + len(prompt)
        assert not ex.loss[:head].any() and ex.loss[head:].all()  # no loss on BOS and prompt, loss on all text
        text.extend(ex.tokens[head:])
    assert text == list(doc) + [EOS]  # chunks tile the document exactly, EOS once at the end
    assert len(used) == 3  # prompts are sampled per chunk, not once per document


def test_prompt_tokens_are_never_targets():
    docs = [np.arange(100, 100 + n, dtype=np.int32) for n in (5, 40, 130)]
    for pack in (False, True):
        rows = data.domain_rows(docs, PROMPTS, 64, BOS, EOS, PAD, seed=0, pack=pack)
        batch = data.to_batch(rows, np.arange(len(rows)), "cpu")
        targets = batch["targets"][batch["targets"] != -100].tolist()
        # Every target is a document token or EOS; every document token is a target exactly once.
        assert sorted(targets) == sorted(np.concatenate(docs).tolist() + [EOS] * len(docs))


def test_cpt_rows_have_no_prompt_and_seeded_prompts_repeat():
    doc = [np.arange(100, 300, dtype=np.int32)]
    cpt = data.domain_rows(doc, [[]], 64, BOS, EOS, PAD, seed=0, pack=False)
    assert (cpt.loss[:, 1:].sum(1) > 0).all() and (cpt.tokens[:, 1] >= 100).all()
    a, b = (data.domain_rows(doc, PROMPTS, 64, BOS, EOS, PAD, seed=3, pack=True) for _ in range(2))
    assert np.array_equal(a.tokens, b.tokens)


def test_packed_documents_cannot_attend_across_boundaries():
    torch.manual_seed(0)
    model = create_model(tiny_cfg(), seed=0)
    docs = [np.random.default_rng(i).integers(40, 500, n).astype(np.int32) for i, n in enumerate((20, 33, 9))]
    rows = data.domain_rows(docs, PROMPTS, 96, BOS, EOS, PAD, seed=0, pack=True)
    assert len(rows) == 1 and rows.doc_ids[0].max() == 3  # three documents and padding in one row
    batch = data.to_batch(rows, [0], "cpu")
    mask = AttentionMask(doc_ids=batch["doc_ids"])
    with torch.no_grad():
        packed = model(batch["tokens"], mask=mask)[0]
        ids = batch["doc_ids"][0]
        for d in range(3):  # each document alone gives the same logits (rotary attention is relative)
            alone = model(batch["tokens"][:, ids == d])[0]
            torch.testing.assert_close(packed[ids == d], alone, rtol=1e-5, atol=1e-5)
        # Changing document 0 leaves the others' logits bit-identical.
        changed = batch["tokens"].clone()
        changed[0, ids == 0] = 7
        after = model(changed, mask=mask)[0]
        assert torch.equal(after[ids > 0], packed[ids > 0]) and not torch.equal(after[ids == 0], packed[ids == 0])


def test_instruction_examples_train_on_the_response_only():
    ex = data.instruction_example([50, 51, 52], [60, 61], BOS, EOS)
    assert ex.tokens.tolist() == [BOS, 50, 51, 52, 60, 61, EOS]
    assert ex.loss.tolist() == [False] * 4 + [True] * 3


def test_mix_rows_reaches_the_ratio():
    main = data.make_rows([data.TrainingExample(np.array([BOS, 5, 6], np.int32), np.array([0, 1, 1], bool))] * 30, 8, PAD, False)
    extra = data.make_rows([data.TrainingExample(np.array([BOS, 9], np.int32), np.array([0, 1], bool))] * 4, 8, PAD, False)
    mixed = data.mix_rows(main, extra, 0.25, seed=0)
    assert len(mixed) == 40 and (mixed.tokens[:, 1] == 9).sum() == 10


def test_sampler_splits_each_global_batch_over_ranks_and_reshuffles_per_epoch():
    sampler = data.GlobalBatchSampler([30, 10], global_batch=8, seed=0)
    assert len(sampler) == 5
    order = sampler.order()
    assert sorted(order[:30]) == list(range(30)) and sorted(order[30:]) == list(range(30, 40))  # stage 2 after stage 1
    for step in range(len(sampler)):
        shares = [sampler.batch(step, r, 4, order) for r in range(4)]
        assert np.array_equal(np.concatenate(shares), sampler.batch(step, order=order))
    sampler.set_epoch(1)
    assert not np.array_equal(sampler.order(), order)
    with pytest.raises(ValueError, match="global batch"):
        data.GlobalBatchSampler([3], global_batch=8, seed=0)


def test_corpus_readers_jsonl_gzip_txt_and_bad_input(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_bytes(b'{"body": "first"}\n\n{"body": "bad \xff byte"}\n{"body": "second"}\n')
    with gzip.open(corpus / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"body": "third"}) + "\n")
    (corpus / "c.txt").write_text("a whole text file")
    (corpus / "d.txt").write_bytes(b"\xfe\xff not utf-8")
    (corpus / "ignored.csv").write_text("x")
    texts, stats = data.read_corpus(corpus, "body")
    assert texts == ["first", "second", "third", "a whole text file"]
    assert stats.skipped_non_utf8 == 2 and stats.files == 4
    with pytest.raises(ValueError, match=r"a\.jsonl:1: no field 'text'"):
        data.read_corpus(corpus / "a.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty corpus"):
        data.read_corpus(tmp_path / "empty.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"broken\.jsonl:2: not valid JSON"):
        data.read_corpus(tmp_path / "broken.jsonl")


def test_tokenization_is_cached_and_parallel_equals_serial(tmp_path, tokenizer_path):
    texts = [f"The patient reduced the dose {i} times." for i in range(600)]
    serial = data.tokenize_texts(texts, tokenizer_path, workers=1, progress=False)
    parallel = data.tokenize_texts(texts, tokenizer_path, tmp_path, workers=2, progress=False)
    assert all(np.array_equal(a, b) for a, b in zip(serial, parallel))
    assert serial[0].tolist() == data.Tokenizer(tokenizer_path).encode(texts[0])
    cached = list(tmp_path.glob("tokens-*.npz"))
    assert len(cached) == 1
    again = data.tokenize_texts(texts, tokenizer_path, tmp_path, workers=2, progress=False)
    assert all(np.array_equal(a, b) for a, b in zip(serial, again))
    data.tokenize_texts(texts[:-1], tokenizer_path, tmp_path, workers=1, progress=False)
    assert len(list(tmp_path.glob("tokens-*.npz"))) == 2  # a different corpus never reuses the cache


def test_one_jsonl_reader_names_path_and_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"a": 1}\n\n{"a": "\xff"}\n')
    with pytest.raises(ValueError, match=r"t\.jsonl:3: not UTF-8 text"):
        list(data.read_jsonl(path))  # strict without stats
    stats = data.CorpusStats()
    assert list(data.read_jsonl(path, stats)) == [(1, {"a": 1})] and stats.skipped_non_utf8 == 1
    gz = tmp_path / "t.jsonl.gz"
    with gzip.open(gz, "wb") as f:
        f.write(b'{"a": 1}\n' * 1000)
    gz.write_bytes(gz.read_bytes()[:-20])  # truncated
    with pytest.raises(ValueError, match=r"t\.jsonl\.gz:\d+: unreadable"):
        list(data.read_jsonl(gz))
    with pytest.raises(ValueError, match=r"where:7: field 'a' is int, expected str"):
        data.require_field({"a": 1}, "a", "where:7")


def test_tokenizer_rule_flag_then_checkpoint_folder(tmp_path, tokenizer_path):
    assert data.Tokenizer.resolve(tokenizer_path).path == tokenizer_path
    folder = tmp_path / "ckpt"
    folder.mkdir()
    with pytest.raises(ValueError, match="has no tokenizer.model; pass --tokenizer"):
        data.Tokenizer.resolve(None, folder)
    (folder / "tokenizer.model").write_bytes(open(tokenizer_path, "rb").read())
    assert data.Tokenizer.resolve(None, folder).path == str(folder / "tokenizer.model")
    with pytest.raises(ValueError, match="no checkpoint folder was given"):
        data.Tokenizer.resolve()


# ----------------------------------------------------------------------------------------------------------------------
# Llama-3.x tokenizers: a tokenizer.json (byte-level BPE, BOS added by its post-processor), ids from the checkpoint.

SENTENCES = [f"The patient {w} the dose {i} times in café №{i}." for i, w in enumerate(["reduced", "doubled"] * 200)]


def llama3_style_tokenizer(folder, config=True):
    """A tiny tokenizer.json laid out as Llama-3's: byte-level BPE, special tokens, BOS from a TemplateProcessing."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    tk.train_from_iterator(SENTENCES, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos = tk.token_to_id(specials[0])
    tk.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), processors.TemplateProcessing(
        single=f"{specials[0]} $A", pair=f"{specials[0]} $A {specials[0]} $B", special_tokens=[(specials[0], bos)])])
    folder.mkdir(exist_ok=True)
    tk.save(str(folder / "tokenizer.json"))
    if config:  # instruct checkpoints list several end ids; the first is end of text
        (folder / "config.json").write_text(json.dumps({"bos_token_id": bos, "eos_token_id": [1, 2]}))
    return tk


def test_tokenizer_json_encodes_without_the_post_processor_bos_unless_asked(tmp_path):
    reference = llama3_style_tokenizer(tmp_path / "ckpt")
    tok = data.Tokenizer.resolve(None, tmp_path / "ckpt")  # no tokenizer.model: the tokenizer.json
    assert tok.path == str(tmp_path / "ckpt" / "tokenizer.json") and tok.sp is None
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, reference.get_vocab_size())
    for text in ["The patient doubled the dose.", " leading", "", "naïve 中文"]:
        plain = reference.encode(text, add_special_tokens=False).ids
        assert tok.encode(text) == plain and tok.encode(text, bos=True, eos=True) == [0] + plain + [1]
        assert reference.encode(text).ids == [0] + plain  # the file's own BOS, which encode leaves out
        assert tok.decode(tok.encode(text, bos=True)) == text
    texts = SENTENCES[:300]
    tokens = data.tokenize_texts(texts, tok.path, workers=2, progress=False)
    assert [t.tolist() for t in tokens] == [tok.encode(t) for t in texts]


def test_tokenizer_json_ids_from_tokenizer_config_and_errors(tmp_path):
    llama3_style_tokenizer(tmp_path / "ckpt", config=False)
    with pytest.raises(ValueError, match="no BOS id .*bos_token_id in config.json or bos_token in tokenizer_config"):
        data.Tokenizer.resolve(None, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|eot_id|>"}, "pad_token": None}))
    tok = data.Tokenizer.resolve(tmp_path / "ckpt")  # --tokenizer may name the folder
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 2, 2)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a Hugging Face tokenizer.json"):
        data.Tokenizer(tmp_path / "bad.json")


def test_tokenizer_json_encodes_like_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    llama3_style_tokenizer(tmp_path / "ckpt")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
              "eos_token": "<|end_of_text|>"}
    (tmp_path / "ckpt" / "tokenizer_config.json").write_text(json.dumps(config))
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    tok = data.Tokenizer.resolve(None, tmp_path / "ckpt")
    for text in SENTENCES[:20] + ["  two  spaces\n", "emoji 😀"]:
        assert hf_tokenizer(text)["input_ids"] == tok.encode(text, bos=True)


# ----------------------------------------------------------------------------------------------------------------------
# .json corpus files: a list of records, an object of records keyed by id, one record, or JSON lines named .json.


def test_json_corpus_files_list_object_and_json_lines(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.json").write_text(json.dumps([{"text": "first"}, {"text": "second"}], indent=2))
    with gzip.open(corpus / "b.json.gz", "wt") as f:
        json.dump({"123": {"text": "third"}, "456": {"text": " "}}, f, indent=4)
    (corpus / "c.json").write_text('{"text": "fourth"}\n{"text": "fifth"}\n')  # JSON lines
    (corpus / "d.json").write_text(json.dumps({"text": "sixth", "meta": {"source": "x"}}))  # one record
    texts, stats = data.read_corpus(corpus)
    assert texts == ["first", "second", "third", "fourth", "fifth", "sixth"]
    assert stats.files == 4 and stats.skipped_empty == 1
    (tmp_path / "fields.json").write_text(json.dumps([{"CONTEXTS": ["Background.", "Methods."], "ANSWER": "Yes."}]))
    assert data.read_corpus(tmp_path / "fields.json", "CONTEXTS,ANSWER")[0] == ["Background.\nMethods.\nYes."]
    with pytest.raises(ValueError, match=r"b\.json\.gz: record '123': no field 'body' .*--text-field"):
        data.read_corpus(corpus / "b.json.gz", "body")
    with pytest.raises(ValueError, match=r"fields\.json: record 0: field 'ANSWER' is int"):
        (tmp_path / "fields.json").write_text(json.dumps([{"CONTEXTS": ["a"], "ANSWER": 3}]))
        data.read_corpus(tmp_path / "fields.json", "CONTEXTS,ANSWER")
    (tmp_path / "broken.json").write_text('[{"text": "a"},\n {"text": }]')
    with pytest.raises(ValueError, match=r"broken\.json:2: not valid JSON"):
        data.read_corpus(tmp_path / "broken.json")
    (tmp_path / "number.json").write_text("3")
    with pytest.raises(ValueError, match=r"number\.json: expected a list of records or an object of records"):
        data.read_corpus(tmp_path / "number.json")
    (tmp_path / "pairs.json").write_text(json.dumps([{"prompt": "Q?", "response": "A."}]))
    assert data.read_instructions(tmp_path / "pairs.json") == [("Q?", "A.")]


def test_the_staged_pubmedqa_corpus_reads_as_abstracts():
    from conftest import SHARED_DATA
    folder = SHARED_DATA / "pubmedqa-corpus"
    if not folder.is_dir():
        pytest.skip("../shared/data/pubmedqa-corpus not present")
    texts, stats = data.read_corpus(folder, "CONTEXTS,LONG_ANSWER")
    assert stats.documents == 1000 and stats.files == 1
    assert 200_000 < sum(len(t.split()) for t in texts) < 300_000  # about 240k words (its SOURCE.md)


def test_damaged_text_corpus_and_non_utf8_prompts_are_one_clear_error(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt.gz").write_text("not gzip")
    with pytest.raises(ValueError, match=r"a\.txt\.gz: unreadable"):
        data.read_corpus(tmp_path / "d")
    (tmp_path / "p.txt").write_bytes(b"\xff\xfe prompts")
    with pytest.raises(ValueError, match=r"p\.txt: not UTF-8 text"):
        data.load_prompts(tmp_path / "p.txt")
