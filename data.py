"""Data for contextual fine-tuning: the tokenizer wrapper, contextual prompts, corpora, example construction."""
from pathlib import Path

import sentencepiece as spm


class Tokenizer:
    """sentencepiece wrapper: the project's one tokenizer interface (Llama-2's tokenizer.model or a tiny test one)."""

    def __init__(self, path):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer {path}: no such file (expected a sentencepiece tokenizer.model)")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"tokenizer {path}: not a sentencepiece model ({e})") from None
        self.path = str(path)
        self.vocab_size = self.sp.vocab_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_id = max(self.sp.pad_id(), 0)  # Llama-2 defines no pad token: pad with 0 (<unk>), always masked

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return [self.bos_id] * bos + self.sp.EncodeAsIds(text) + [self.eos_id] * eos

    def decode(self, ids) -> str:
        return self.sp.DecodeIds(list(ids))

    def check_vocab(self, vocab_size: int) -> None:
        if self.vocab_size != vocab_size:
            raise ValueError(f"tokenizer {self.path} has {self.vocab_size} tokens but the model's vocabulary has "
                             f"{vocab_size}: they do not belong together")


# (cft helper: contextual prompts, corpus readers, example construction below)
