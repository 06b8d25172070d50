"""What a cft.py run starts from, checked before anything is written or allocated: the flags' numbers and
combinations, the model (--model NAME -> its Hugging Face folder, or a random-init preset), its config and the memory
it needs, the domain (--data, or the built-in fictional pharmacology with its questions), the tokenizer and the other
input files. Every refusal is a one-line ValueError naming the flag or file (cft.py exits with it).
"""
import math
import os
from dataclasses import dataclass
from pathlib import Path

import data
from data import Tokenizer
from hf_checkpoint import check_training_memory, resolve_model
from method_data import ExtraInputs, read_extra_inputs, read_input
from model import PRECISIONS, ModelConfig, default_precision
from pharmacology import builtin_domain, make_world, world_documents, world_questions

# The random-init demo's model: 0.9M parameters, learns the fictional facts in about a minute on 2 CPU cores.
DEMO_MODEL = dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=352, max_seq_len=512)


def check_settings(cfg, env) -> None:
    """Numbers and combinations of flags, before anything is read or written."""
    at_least = {"seq_len": 1, "batch_size": 1, "micro_batch_size": 1, "epochs": 1, "auto_prompt_tokens": 1,
                "promot_prompt_len": 1, "save_every": 0, "eval_every": 0, "lora_rank": 0, "promot_prompt_steps": 0,
                "promot_select_prompt_every": 0, "promot_select_model_every": 0, "workers": 1, "stop_after": 1,
                "max_steps": 0 if cfg.promot_prompt_steps else 1}  # prompt tuning alone: stage 2 of 0 steps
    for name, low in at_least.items():
        value = getattr(cfg, name)
        if value is not None and value < low:
            raise ValueError(f"--{name.replace('_', '-')} {value}: must be at least {low}")
    below_one = 1 - 1e-9
    ranges = {"lr": (0, math.inf), "promot_lr": (0, math.inf), "weight_decay": (0, math.inf), "clip": (0, math.inf),
              "lora_alpha": (0, math.inf), "warmup": (0, 1), "heldout_fraction": (0, below_one),
              "instruct_ratio": (0, below_one), "general_ratio": (1e-9, below_one), "lora_dropout": (0, below_one),
              "peak_tflops": (1e-9, math.inf)}
    for name, (low, high) in ranges.items():
        value = getattr(cfg, name)
        if not (math.isfinite(value) and low <= value <= high):
            interval = f"[{low:g}, {high:g}]" if high != below_one else f"[{low:g}, 1)"
            raise ValueError(f"--{name.replace('_', '-')} {value}: expected a number in {interval}"
                             + (" (1 would hold out every document)" if name == "heldout_fraction" else ""))
    if cfg.batch_size % (env.world * cfg.micro_batch_size):
        raise ValueError(f"--batch-size {cfg.batch_size} must be a multiple of processes ({env.world}) x "
                         f"--micro-batch-size ({cfg.micro_batch_size})")
    if cfg.merge_lora and not cfg.lora_rank:
        raise ValueError("--merge-lora needs --lora-rank (there is no adapter to merge)")
    if cfg.promot_select and not cfg.heldout_fraction:
        raise ValueError("--promot-select picks checkpoints by held-out target loss: pass --heldout-fraction "
                         "(e.g. 0.1)")


@dataclass
class Inputs:
    texts: list[str]
    questions: list[dict] | None  # the built-in domain's closed-book questions
    tokenizer: Tokenizer
    model_cfg: ModelConfig
    methods: list[str]
    extra: ExtraInputs


def resolve_inputs(cfg, env) -> Inputs:
    """Check every input before any training starts, and before any allocation (the memory check). Fills in
    cfg.cache_dir, cfg.precision and (--model NAME) cfg.checkpoint."""
    cfg.cache_dir = cfg.cache_dir or str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cft")
    cfg.precision = cfg.precision or default_precision(env.device)
    if cfg.precision == "fp16":
        raise ValueError("--precision fp16: training in fp16 needs loss scaling, which cft.py does not do; use bf16 "
                         "or fp32")
    check_settings(cfg, env)
    resolve_model_folder(cfg, env)
    if cfg.method == "auto-cft" and not (cfg.checkpoint or cfg.model):
        raise ValueError("--method auto-cft needs a model that can write prompts: pass --model (or --checkpoint)")
    texts, questions, tokenizer = load_domain(cfg, env)
    extra = read_extra_inputs(cfg)
    try:
        if cfg.checkpoint:
            model_cfg = ModelConfig.from_hf(cfg.checkpoint)
        elif cfg.model:
            model_cfg = ModelConfig.from_name(cfg.model, vocab_size=tokenizer.vocab_size)
        else:
            model_cfg = ModelConfig(vocab_size=tokenizer.vocab_size, **DEMO_MODEL)
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None
    tokenizer.check_vocab(model_cfg.vocab_size)
    n_soft = cfg.promot_prompt_len * (cfg.promot_prompt_steps > 0)
    if cfg.seq_len + n_soft > model_cfg.max_seq_len:
        raise ValueError(f"--seq-len {cfg.seq_len}" + (f" + --promot-prompt-len {n_soft}" if n_soft else "")
                         + f" exceeds the model's max_seq_len {model_cfg.max_seq_len}")
    if cfg.memory_check:
        check_training_memory(model_cfg, env.device, world=env.world,
                              local_world=int(os.environ.get("LOCAL_WORLD_SIZE", env.world)),
                              lora_rank=cfg.lora_rank, activation_checkpointing=cfg.activation_checkpointing,
                              micro_batch=cfg.micro_batch_size, seq_len=cfg.seq_len + n_soft,
                              param_dtype=PRECISIONS[cfg.precision])
    methods = [cfg.method] if cfg.method else (["cft", "cpt"] if cfg.data is None else ["cft"])
    return Inputs(texts, questions, tokenizer, model_cfg, methods, extra)


def resolve_model_folder(cfg, env) -> None:
    """--model NAME -> its folder (hf_checkpoint.resolve_model, never a download; one line naming it) into
    cfg.checkpoint; --random-init keeps the name as a preset of random weights; --checkpoint is a folder as given."""
    if cfg.checkpoint and cfg.model:
        raise ValueError("pass either --model or --checkpoint (the same thing for a folder), not both")
    if cfg.random_init:
        if not cfg.model:
            raise ValueError("--random-init needs --model PRESET (e.g. tiny, llama2-7b): the shape of the random "
                             "model")
        return
    if cfg.model:
        cfg.checkpoint = str(resolve_model(cfg.model, cfg.model_dir))
        if env.is_main:
            print(f"model {cfg.model}: weights from {cfg.checkpoint}")
    elif cfg.model_dir:
        raise ValueError("--model-dir is where --model NAME is looked up: pass --model too")


def load_domain(cfg, env):
    """(texts, questions or None, tokenizer): the built-in pharmacology or --data, and the tokenizer: --tokenizer,
    else the model's own, else (random-init demo) the demo's; one line says which."""
    if cfg.data is None and cfg.checkpoint:  # real weights: the fictional domain in the model's own tokens
        world = make_world(cfg.seed)
        texts, questions = world_documents(world, cfg.seed), world_questions(world, cfg.seed)
        why = "the model's own"
    elif cfg.data is None:
        if env.is_main:  # trains and caches the demo tokenizer once; the other ranks read it
            Path(cfg.cache_dir).mkdir(parents=True, exist_ok=True)
            builtin_domain(Path(cfg.cache_dir), cfg.seed)
        env.barrier()
        texts, questions, demo_tokenizer = builtin_domain(Path(cfg.cache_dir), cfg.seed)
        why = "the random-init demo's, trained on its documents"
    else:
        texts, stats = read_input("--data", cfg.data, data.read_corpus, cfg.text_field)
        questions, why = None, "the model's own"
        if env.is_main:
            print(f"corpus {cfg.data}: {stats.summary()}")
        if cfg.random_init and not cfg.tokenizer:
            raise ValueError("--random-init with --data: pass --tokenizer FILE (random weights come without a "
                             "tokenizer)")
    try:
        if cfg.tokenizer:
            tokenizer, why = Tokenizer.resolve(cfg.tokenizer), "--tokenizer"
        else:
            tokenizer = demo_tokenizer if cfg.data is None and not cfg.checkpoint else \
                Tokenizer.resolve(None, cfg.checkpoint)
    except FileNotFoundError as e:
        raise ValueError(f"--tokenizer: {e}") from None
    if env.is_main:
        print(f"tokenizer: {tokenizer.path} ({why})")
    return texts, questions, tokenizer
