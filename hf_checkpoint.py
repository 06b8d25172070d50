"""Hugging Face checkpoint folders: finding a model's folder, the memory a run needs, weights in and out.

Read top to bottom: model folders (a preset name -> its Hugging Face repository -> a local folder; nothing is ever
downloaded) -> memory estimates (refuse a run that cannot fit, before allocating) -> loading -> saving.
load_weights streams one tensor at a time into a model.py Transformer (under FSDP2 each rank reads only its own rows);
save_pretrained writes a complete Hugging Face folder (weights, config.json, generation_config.json, tokenizer files)
through a staging folder (atomic.py), so transformers and vLLM load it unchanged and an interrupted save never leaves
a broken checkpoint. Parameter names equal Hugging Face's minus the leading "model.", so loading and saving is a
rename, not a remap.
"""
import json
import math
import os
import shutil
from pathlib import Path

import torch

from atomic import commit_folder, save_tensors, staging_folder
from data import folder_tokenizer_file
from lora import LoRALinear
from model import MODEL_PRESETS, ModelConfig, Transformer

SHARD_BYTES = 5 * 1000**3  # the 5 GB shard size that transformers writes by default
GiB = 1024**3


# ----------------------------------------------------------------------------------------------------------------------
# Model folders. `--model NAME` is looked up in --model-dir, then in the Hugging Face cache, then as a plain path.

MODEL_REPOS = {
    "llama2-7b": "meta-llama/Llama-2-7b-hf", "llama2-7b-chat": "meta-llama/Llama-2-7b-chat-hf",
    "llama2-13b": "meta-llama/Llama-2-13b-hf", "llama2-13b-chat": "meta-llama/Llama-2-13b-chat-hf",
    "llama2-70b": "meta-llama/Llama-2-70b-hf", "llama2-70b-chat": "meta-llama/Llama-2-70b-chat-hf",
    "llama3.1-8b": "meta-llama/Llama-3.1-8B", "llama3.1-8b-instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "llama3.2-1b": "meta-llama/Llama-3.2-1B", "llama3.2-1b-instruct": "meta-llama/Llama-3.2-1B-Instruct",
    "llama3.2-3b": "meta-llama/Llama-3.2-3B", "llama3.2-3b-instruct": "meta-llama/Llama-3.2-3B-Instruct",
}


def hub_cache_dir() -> Path:
    """Where huggingface_hub keeps downloads: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def download_command(repo: str) -> str:
    """The command that puts `repo` into the Hugging Face cache. The Llama repositories also hold pickled copies of
    the weights (*.bin, original/*.pth) that this project never reads; excluding them halves the download."""
    return f"hf download {repo} --exclude '*.bin' --exclude '*.pth'"


def cache_snapshot(cache: Path, repo: str) -> Path | None:
    """The snapshot folder of `repo` in a Hugging Face cache: the revision refs/main names, else the newest one
    holding a config.json."""
    entry = cache / f"models--{repo.replace('/', '--')}"
    ref = entry / "refs" / "main"
    if ref.is_file():
        snapshot = entry / "snapshots" / ref.read_text().strip()
        if (snapshot / "config.json").is_file():
            return snapshot
    snapshots = [s for s in (entry / "snapshots").glob("*") if (s / "config.json").is_file()]
    return max(snapshots, key=lambda s: s.stat().st_mtime) if snapshots else None


def resolve_model(name_or_path, model_dir=None) -> Path:
    """The folder of a model: a preset name (MODEL_REPOS), a Hugging Face repository id (org/name) or a path.
    Looked up in order in `model_dir` (<dir>/<name>, <dir>/<repo name>, <dir>/<org>/<repo name>), in the Hugging Face
    cache, and as a plain path; a folder counts when it holds config.json. Not found: one-line ValueError naming the
    places and the download command. Nothing is downloaded."""
    name = str(name_or_path)
    repo = MODEL_REPOS.get(name, name if name.count("/") == 1 and not Path(name).exists() else None)
    candidates = []
    if model_dir:
        candidates.append(Path(model_dir) / name)
        if repo:
            candidates += [Path(model_dir) / repo.split("/")[1], Path(model_dir) / repo]
    cache = hub_cache_dir()
    snapshot = cache_snapshot(cache, repo) if repo else None
    candidates += [snapshot] if snapshot else []
    candidates.append(Path(name).expanduser())
    for folder in candidates:
        if (folder / "config.json").is_file():
            return folder
    if Path(name).is_dir():
        raise ValueError(f"model {name}: {name} has no config.json (expected a Hugging Face Llama folder)")
    if name in MODEL_PRESETS and not repo:  # a shape of this project's own (tiny): nothing to download
        raise ValueError(f"model {name}: a shape with no released weights; add --random-init for random ones")
    places = [str(c) for c in candidates[:-1] if c != snapshot]
    places += [str(cache / f"models--{repo.replace('/', '--')}")] if repo else []
    places += [f"the path {name}"]
    get = (f"; download it with `{download_command(repo)}` (huggingface_hub < 1.0: `huggingface-cli download {repo}`"
           f"; a gated repository: accept its license on huggingface.co and log in first)") if repo else \
        f" (and it is not a preset: {', '.join(MODEL_REPOS)})"
    # every script that resolves a name also takes --random-init (a preset's shape with random weights)
    raise ValueError(f"model {name}: not found in {', '.join(places)}{get} (random weights of a preset: add "
                     f"--random-init)")


# ----------------------------------------------------------------------------------------------------------------------
# Memory: estimate what a run needs per process and refuse, with one line saying what would fit, before allocating.
#
# Training (bytes per process; W = processes sharing the model under FSDP2, d = the compute dtype's bytes):
#   weights  16 B per trained parameter (fp32 master + fp32 gradient + AdamW's two fp32 moments) / W
#            + 4 B per frozen parameter (LoRA's base weights, fp32) / W
#            + 2 blocks' parameters in the compute dtype (FSDP gathers one block and prefetches the next; without
#              FSDP: autocast's per-layer casts) + d B per trained parameter without FSDP (autocast keeps their casts)
#   activations  micro_batch · seq_len · (layers · a + vocab · (d + 8)), a = d · (10 dim + 4 ffn) per token and
#            layer (the tensors a block saves for backward); with activation checkpointing a = d · dim per layer
#            plus one block's full a while it is recomputed. The vocab term: logits, their fp32 copy and gradient.
# Inference: parameters · d + batch_tokens · (layers · 2 · kv_dim · d  (keys/values)  + vocab · (d + 8)).
# Rough by design (no allocator fragmentation, no CUDA context): it refuses hopeless runs, it does not promise a fit.


def lora_parameter_count(cfg: ModelConfig, rank: int, targets=("q_proj", "k_proj", "v_proj", "o_proj")) -> int:
    """Parameters of LoRA adapters of `rank` on the named linear layers of every block (A: r x in, B: out x r)."""
    kv = cfg.n_kv_heads * cfg.head_dim
    shapes = {"q_proj": (cfg.dim, cfg.dim), "k_proj": (cfg.dim, kv), "v_proj": (cfg.dim, kv),
              "o_proj": (cfg.dim, cfg.dim), "gate_proj": (cfg.dim, cfg.ffn_dim), "up_proj": (cfg.dim, cfg.ffn_dim),
              "down_proj": (cfg.ffn_dim, cfg.dim)}
    return cfg.n_layers * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)


def training_bytes(cfg: ModelConfig, *, world: int = 1, lora_rank: int = 0, activation_checkpointing: bool = False,
                   micro_batch: int = 1, seq_len: int = 2048, param_dtype: torch.dtype = torch.bfloat16) -> int:
    """Estimated device bytes per process of a training run (see the formula above)."""
    d = torch.empty(0, dtype=param_dtype).element_size()
    total = cfg.num_params()
    trained = lora_parameter_count(cfg, lora_rank) if lora_rank else total
    frozen = total - trained if lora_rank else 0
    block = (total - cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2)) // cfg.n_layers
    weights = (16 * trained + 4 * frozen) / world + 2 * block * d + (d * trained if world == 1 and d < 4 else 0)
    per_layer = d * (10 * cfg.dim + 4 * cfg.ffn_dim)
    if activation_checkpointing:
        per_token = cfg.n_layers * d * cfg.dim + per_layer
    else:
        per_token = cfg.n_layers * per_layer
    activations = micro_batch * seq_len * (per_token + cfg.vocab_size * (d + 8))
    return int(weights + activations)


def inference_bytes(cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16, batch_tokens: int = 8192) -> int:
    """Estimated device bytes of scoring or generating with `batch_tokens` tokens in flight (see above)."""
    d = torch.empty(0, dtype=dtype).element_size()
    kv = cfg.n_kv_heads * cfg.head_dim
    return int(cfg.num_params() * d + batch_tokens * (cfg.n_layers * 2 * kv * d + cfg.vocab_size * (d + 8)))


def available_bytes(device) -> int:
    """Free memory of `device`: the GPU's free bytes on CUDA; on CPU the host's MemAvailable (or free pages), lowered
    to a container's cgroup limit when one is set."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except OSError:
        pass
    if free is None:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:  # cgroup v2: a container's limit can be far below the host's free memory
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            free = min(free, int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return free


def check_memory(needed: int, device, what_would_fit: str = "") -> None:
    """Refuse, in one line with both numbers in GiB and what would fit, a run that needs more than `device` has."""
    free = available_bytes(device)
    if needed > free:
        raise ValueError(f"not enough memory on {device}: the run needs about {needed / GiB:.1f} GiB, "
                         f"{free / GiB:.1f} GiB is available" + (f"; {what_would_fit}" if what_would_fit else "")
                         + " (--no-memory-check to try anyway)")


def training_fit_advice(cfg: ModelConfig, available: int, *, sharing: int = 1, max_world: int = 64,
                        **settings) -> str:
    """What would fit in `available` bytes, shared by `sharing` processes (1 per GPU; all of them on a CPU host):
    more processes (GPUs, up to max_world), --lora-rank, --activation-checkpointing, --micro-batch-size 1, alone or
    together; the first three that fit, simplest first. `settings` are training_bytes' keyword arguments."""
    settings = dict(world=1, lora_rank=0, activation_checkpointing=False, micro_batch=1) | settings
    world, rank = settings["world"], settings["lora_rank"] or 16
    ac, small, lora = {"activation_checkpointing": True}, {"micro_batch": 1}, {"lora_rank": rank}
    candidates = [("", {}), ("--activation-checkpointing", ac), (f"--lora-rank {rank}", lora),
                  ("--micro-batch-size 1 --activation-checkpointing", small | ac),
                  (f"--lora-rank {rank} --activation-checkpointing", lora | ac),
                  (f"--lora-rank {rank} --micro-batch-size 1 --activation-checkpointing", lora | small | ac)]
    found = []  # (processes, changes, words)
    for flags, changes in candidates:
        if changes and all(settings[k] == v for k, v in changes.items()):
            continue  # already set: not advice
        trial = settings | changes
        fits = next((n for n in range(world, max(world, max_world) + 1)
                     if sharing * training_bytes(cfg, **(trial | {"world": n})) <= available), None)
        if fits is None or any(n <= fits and c.items() <= changes.items() for n, c, _ in found):
            continue  # does not fit, or a simpler change already fits with as few processes
        found.append((fits, changes, " with ".join(filter(None, [f"{fits} processes (GPUs)" if fits > world else "",
                                                                  flags]))))
    advice = [words for _, _, words in found if words][:3]
    more = f" with up to {max_world} processes" if max_world > world else ""
    return ("would fit: " + "; or ".join(advice)) if advice else f"nothing would fit in {available / GiB:.1f} GiB{more}"


def check_training_memory(cfg: ModelConfig, device, *, world: int = 1, local_world: int | None = None,
                          **settings) -> int:
    """Refuse a training run that does not fit (one line with both numbers and what would fit); the bytes needed.
    On CUDA every process has its own GPU; on CPU the `local_world` processes of this host (default: world) share
    its memory, and more processes would not add any. `settings` are training_bytes' keyword arguments."""
    on_gpu = torch.device(device).type == "cuda"
    sharing = 1 if on_gpu else (local_world or world)
    needed = sharing * training_bytes(cfg, world=world, **settings)
    if needed > available_bytes(device):
        advice = training_fit_advice(cfg, available_bytes(device), sharing=sharing, max_world=64 if on_gpu else world,
                                     world=world, **settings)
        check_memory(needed, device, advice)
    return needed


def check_inference_memory(cfg: ModelConfig, device, dtype: torch.dtype, batch_tokens: int = 8192,
                           processes: int = 1) -> int:
    """Refuse scoring/generation that does not fit (`processes` share a CPU host's memory); the bytes needed."""
    needed = inference_bytes(cfg, dtype, batch_tokens) * (processes if torch.device(device).type != "cuda" else 1)
    smaller = "a smaller --batch-tokens" + (", --precision bf16" if dtype == torch.float32 else "")
    check_memory(needed, device, f"would fit: {smaller} or a device with more memory")
    return needed


# ----------------------------------------------------------------------------------------------------------------------
# Loading


def hf_key(name: str) -> str:
    return name if name.startswith("lm_head.") else "model." + name


def checkpoint_files(path) -> list[Path]:
    """The safetensors files of a HF folder; a missing shard is an error naming it."""
    path = Path(path)
    index, single = path / "model.safetensors.index.json", path / "model.safetensors"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: not a safetensors index (no weight_map: {e})") from None
        for name in names:
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path / name}: shard listed in {index.name} is missing")
        return [path / name for name in names]
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


def _copy_into(target: torch.Tensor, sliced) -> None:
    """Copy one checkpoint tensor (a safetensors slice, read lazily) into a parameter, plain or FSDP2-sharded."""
    from torch.distributed.tensor import DTensor, Shard
    if isinstance(target, DTensor):
        # FSDP2 shards dim 0 as torch.chunk does: rank r holds rows [r*ceil(n/W), ...). Read only those rows.
        if list(target.placements) != [Shard(0)]:
            raise ValueError(f"load: unsupported placements {target.placements}")
        local = target.to_local()
        rows_per_rank = math.ceil(target.shape[0] / target.device_mesh.size())
        start = target.device_mesh.get_local_rank() * rows_per_rank
        if local.shape[0]:
            local.copy_(sliced[start:start + local.shape[0]])
    else:
        target.copy_(sliced[:])


@torch.no_grad()
def load_weights(model: Transformer, path) -> None:
    """Stream a HF checkpoint into `model`, one tensor at a time (peak host memory ~ one tensor)."""
    from safetensors import SafetensorError, safe_open
    params = model.state_dict(keep_vars=True)
    if any(".base." in name for name in params):
        raise ValueError("load: apply LoRA after loading the base weights")
    expected = {hf_key(name): name for name in params}
    seen = set()
    for file in checkpoint_files(path):
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for key in f.keys():
                    if key.endswith("rotary_emb.inv_freq"):  # older checkpoints store the rotary table; we compute it
                        continue
                    if key not in expected:
                        raise ValueError(f"{file}: unexpected tensor {key} (not part of a Llama with this config.json)")
                    target, sliced = params[expected[key]], f.get_slice(key)
                    if tuple(sliced.get_shape()) != tuple(target.shape):
                        raise ValueError(f"{file}: tensor {key} has shape {tuple(sliced.get_shape())}, "
                                         f"config.json implies {tuple(target.shape)}")
                    _copy_into(target, sliced)
                    seen.add(key)
        except SafetensorError as e:
            raise ValueError(f"{file}: truncated or corrupt safetensors file ({e})") from None
    missing = sorted(set(expected) - seen)
    if missing:
        raise ValueError(f"{path}: checkpoint has no tensor {missing[0]}" + (f" (and {len(missing) - 1} more)"
                                                                            if len(missing) > 1 else ""))


def load_pretrained(path, device="cpu", dtype=torch.float32) -> Transformer:
    """A Transformer with the weights of a Hugging Face Llama folder."""
    cfg = ModelConfig.from_hf(path)
    with torch.device("meta"):
        model = Transformer(cfg).to(dtype)
    model.to_empty(device=device)
    load_weights(model, path)
    return model


# ----------------------------------------------------------------------------------------------------------------------
# Saving: a complete Hugging Face folder (weights, config.json, generation_config.json, tokenizer files). Tokenizer
# files beside the tokenizer the model was trained with (a source checkpoint's) are copied unchanged; missing ones are
# written so that transformers.AutoTokenizer.from_pretrained(folder) encodes exactly like
# data.Tokenizer.encode(text, bos=True).

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def checkpoint_dtype(path) -> torch.dtype:
    """The dtype a HF folder stores its weights in: config.json's torch_dtype (transformers 5: dtype), else the
    first tensor's; the dtype to save a fine-tuned copy in."""
    from safetensors import safe_open
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    name = config.get("torch_dtype") or config.get("dtype") if isinstance(config, dict) else None
    if name in DTYPES:
        return DTYPES[name]
    with safe_open(checkpoint_files(path)[0], framework="pt") as f:
        stored = f.get_slice(next(iter(f.keys()))).get_dtype()  # "BF16", "F16", "F32"
    return {"BF16": torch.bfloat16, "F16": torch.float16}.get(stored, torch.float32)


def _write_weights(model: Transformer, folder: Path | None, dtype: torch.dtype, shard_bytes: int) -> None:
    """model.safetensors, or shards + index. Every rank gathers each FSDP2 tensor in turn; only a writer (folder not
    None) keeps and writes them."""
    from torch.distributed.tensor import DTensor
    shards, current, current_bytes = [], {}, 0

    def flush():
        nonlocal current, current_bytes
        if current:
            shards.append(current)
            if folder:
                save_tensors(current, folder / f"shard-{len(shards)}.safetensors", metadata={"format": "pt"})
            current, current_bytes = {}, 0

    for name, tensor in model.state_dict().items():
        tensor = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        tensor = tensor.detach().to("cpu", dtype).contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if current and current_bytes + nbytes > shard_bytes:
            flush()
        current[hf_key(name)] = tensor if folder else nbytes
        current_bytes += nbytes
    flush()
    if not folder:
        return
    if len(shards) == 1:
        os.rename(folder / "shard-1.safetensors", folder / "model.safetensors")
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        os.rename(folder / f"shard-{i}.safetensors", folder / name)
        weight_map.update({key: name for key in shard})
    total = sum(t.numel() * t.element_size() for shard in shards for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def sentencepiece_tokenizer_json(model_file):
    """tokenizer.json text for a sentencepiece BPE model that encodes exactly as sentencepiece does, with the
    post-processor adding BOS (None without the `tokenizers` package). Merges are ordered by piece score, as
    SentencePiece's BPE applies them; the normalizer reproduces the model's own (probed with sp.normalize):
    identity for Llama-2, NFKC + whitespace folding for sentencepiece's default nmt_nfkc (the demo tokenizers)."""
    try:
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, processors
        from tokenizers.models import BPE
    except ImportError:
        return None
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    n = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    merges = []
    for i in range(n):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i):
            continue
        piece = sp.id_to_piece(i)
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        merges += [(a, b, sp.get_score(i)) for a, b in sorted(splits, key=lambda m: (vocab[m[0]], vocab[m[1]]))]
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    unk = sp.id_to_piece(sp.unk_id())
    tk = Tokenizer(BPE(vocab=vocab, merges=[(a, b) for a, b, _ in merges], unk_token=unk, fuse_unk=True,
                       byte_fallback=True))
    steps = []  # sp.normalize shows what the model's normalizer does; each probe adds the matching step
    if sp.normalize("\uff46") == sp.normalize("f"):  # full-width f folded: NFKC
        steps.append(normalizers.NFKC())
    if sp.normalize("a\tb") == sp.normalize("a b"):  # nmt rules: control characters dropped, \t \n \r are spaces
        steps += [normalizers.Replace(Regex("[\\x00-\\x08\\x0b\\x0e-\\x1f\\x7f]"), ""),
                  normalizers.Replace(Regex("[\\t\\n\\r\\f]"), " ")]
    if sp.normalize("a  b") == sp.normalize("a b"):  # remove_extra_whitespaces
        steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Strip()]
    if sp.normalize("a").startswith("\u2581"):  # add_dummy_prefix
        steps.append(normalizers.Prepend("\u2581"))
    steps.append(normalizers.Replace(" ", "\u2581"))
    tk.normalizer = normalizers.Sequence(steps)
    tk.pre_tokenizer = None
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    specials = [sp.id_to_piece(i) for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    bos = sp.id_to_piece(sp.bos_id())
    tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                      special_tokens=[(bos, sp.bos_id())])
    return tk.to_str()


def _tokenizer_config(bos: str, eos: str, unk: str | None, max_len: int) -> dict:
    """tokenizer_config.json for a tokenizer.json: the fast-tokenizer class (transformers 5 reads it as
    TokenizersBackend), which keeps the file's normalizer; split_special_tokens makes "<s>" in text plain text, as
    sentencepiece reads it. (LlamaTokenizer would rebuild the normalizer and mis-tokenize runs of spaces.)"""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos, "unk_token": unk,
            "pad_token": None, "clean_up_tokenization_spaces": False, "model_max_length": max_len,
            "split_special_tokens": True}


def write_tokenizer_files(folder: Path, tokenizer_file, max_len: int = 4096) -> None:
    """Tokenizer files for `folder`: the tokenizer file itself (as tokenizer.model or tokenizer.json) and, when it is
    a Hugging Face folder's own tokenizer file, the TOKENIZER_FILES beside it, copied unchanged; then whatever is
    still missing for a sentencepiece model: tokenizer.json, tokenizer_config.json, special_tokens_map.json."""
    tokenizer_file = Path(tokenizer_file)
    is_json = tokenizer_file.suffix == ".json"
    shutil.copyfile(tokenizer_file, folder / ("tokenizer.json" if is_json else "tokenizer.model"))
    if tokenizer_file.name in TOKENIZER_FILES:
        for name in TOKENIZER_FILES:
            if (tokenizer_file.parent / name).is_file() and not (folder / name).exists():
                shutil.copyfile(tokenizer_file.parent / name, folder / name)
    if is_json:
        return
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_file))
    bos, eos, unk = (sp.id_to_piece(i) for i in (sp.bos_id(), sp.eos_id(), sp.unk_id()))
    built = None if (folder / "tokenizer.json").exists() else sentencepiece_tokenizer_json(tokenizer_file)
    if built is not None:
        (folder / "tokenizer.json").write_text(built)
    if not (folder / "tokenizer_config.json").exists():
        config = _tokenizer_config(bos, eos, unk, max_len) if (folder / "tokenizer.json").exists() else \
            {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "bos_token": bos, "eos_token": eos,
             "unk_token": unk, "legacy": False}  # no `tokenizers` package: transformers' slow-tokenizer route
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    if not (folder / "special_tokens_map.json").exists():
        special = {"bos_token": bos, "eos_token": eos, "unk_token": unk}
        (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


@torch.no_grad()
def save_pretrained(model: Transformer, path, dtype: torch.dtype | None = None, shard_bytes: int = SHARD_BYTES, *,
                    tokenizer=None, source=None, generation_config: dict | None = None) -> Path:
    """Write a complete Hugging Face Llama folder that transformers and vLLM load unchanged: weights in `dtype`
    (default the model's; pass checkpoint_dtype(source) to keep the source's), config.json, generation_config.json
    (`generation_config`, else the source's, else bos/eos from the config) and tokenizer files (write_tokenizer_files)
    of `tokenizer` (a data.Tokenizer or its file), else of the `source` checkpoint folder. Everything is written into
    a staging folder and renamed at the end, so `path` appears whole; an existing non-empty `path` is refused (an
    empty folder is replaced). Works on FSDP2-sharded models when called on every rank; rank 0 writes."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists and is not empty; refusing to overwrite it")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("save_pretrained: merge_lora(model) first (the HF layout has no adapters)")
    is_writer = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    dtype = dtype or next(model.parameters()).dtype
    tmp = staging_folder(path) if is_writer else None
    try:
        _write_weights(model, tmp, dtype, shard_bytes)
        if is_writer:
            _write_metadata(model.cfg, tmp, dtype, tokenizer, source, generation_config)
    except BaseException:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not is_writer:
        return path
    if path.exists():
        path.rmdir()  # empty (checked above)
    return commit_folder(path)


def _write_metadata(cfg: ModelConfig, folder: Path, dtype, tokenizer, source, generation_config) -> None:
    """config.json, generation_config.json and the tokenizer files of save_pretrained."""
    (folder / "config.json").write_text(json.dumps(cfg.to_hf_dict(dtype), indent=2))
    source_generation = Path(source) / "generation_config.json" if source else None
    if generation_config is None and source_generation and source_generation.is_file():
        shutil.copyfile(source_generation, folder / "generation_config.json")
    else:
        generation = generation_config or {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
        (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tokenizer_file = getattr(tokenizer, "path", tokenizer) or folder_tokenizer_file(source)
    if tokenizer_file:
        write_tokenizer_files(folder, tokenizer_file, cfg.max_seq_len)
