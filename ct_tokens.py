"""Context tuning's view of Llama: TokenIO (token embeddings in, next-token cross-entropy out; ct_methods.py's
docstring says what an IO object provides) and a text task's demonstrations as an Episode: [BOS] x_1 y_1 \\n x_2 y_2
\\n ... with loss on each y_i (and its separator), tokenized by scoring.py's rule for an option after its context.
"""
import sys

import torch

import scoring
from ct_methods import NO_TARGET, Demo, Episode


class TokenIO:
    """Llama's inputs and outputs for ct_methods.py. TTT's LoRA adapters touch neither, so one TokenIO serves the
    adapted copies too."""

    def __init__(self, model):
        self.model = model

    @torch.no_grad()
    def embed(self, ids: list[int]) -> torch.Tensor:
        return self.model.embed_tokens(torch.tensor(ids, device=self.model.embed_tokens.weight.device))

    def loss_sums(self, hidden, targets, in_loss):
        """(R,) next-token cross-entropy summed over each row's loss positions; the vocabulary projection runs only
        there (long rows times a 32k-128k vocabulary would not fit otherwise)."""
        per_position = self.model.loss(hidden[in_loss][None], targets[in_loss][None], reduction="none")[0]
        rows = in_loss.nonzero()[:, 0]
        sums = torch.zeros(len(in_loss), device=hidden.device, dtype=per_position.dtype)
        return sums.index_add(0, rows, per_position)

    @torch.no_grad()
    def init_context(self, m: int) -> torch.Tensor:
        """(m, dim): the embeddings of the dummy token ids 0..m-1 (marc's prompt / prefix tuning initialisation)."""
        return self.embed(list(range(min(m, self.model.cfg.vocab_size))))


def newline_ids(tok) -> list[int]:
    """Token ids ending a demonstration: the newline, as it tokenizes after text (sentencepiece adds a leading space
    piece to a lone "\\n"); eos when the tokenizer has no newline."""
    return tok.encode("a\n")[len(tok.encode("a")):] or [tok.eos_id]


def token_demo(model, ids: list[int], n_input: int) -> Demo:
    """A demonstration from its token ids (input, then output and separator): positions n_input-1 .. L-2 predict the
    output tokens; the last position predicts nothing."""
    device = model.embed_tokens.weight.device
    in_loss = torch.zeros(len(ids), dtype=torch.bool, device=device)
    in_loss[n_input - 1:len(ids) - 1] = True
    return Demo(TokenIO(model).embed(ids), torch.tensor(ids[1:] + [NO_TARGET], device=device), in_loss)


def token_lead(model, bos_id: int | None) -> Demo:
    """The context's start: BOS alone (in no loss, in no demonstration's span, never dropped or trained), or nothing
    (bos_id None: marc's layout)."""
    device = model.embed_tokens.weight.device
    ids = [] if bos_id is None else [bos_id]
    embeds = TokenIO(model).embed(ids) if ids else model.embed_tokens.weight[:0].detach()
    return Demo(embeds, torch.full((len(ids),), NO_TARGET, device=device), torch.zeros(len(ids), dtype=torch.bool,
                                                                                        device=device))


def demo_ids(tok, text_input: str, text_output: str, sep: list[int]) -> tuple[list[int], list[int]]:
    """(input ids, output ids + separator): the output's tokens follow scoring.py's rule for an option after its
    context, so that a demonstration's answer is tokenized as a query's options are scored."""
    x = tok.encode(text_input)
    return x, scoring.option_tokens(tok, x, text_input, text_output) + sep


def longest_query_len(tok, task, sep: list[int]) -> int:
    lengths = []
    for q in task.queries:
        x = tok.encode(q.input)
        lengths.append(len(x) + max(len(scoring.option_tokens(tok, x, q.input, o)) for o in q.options or [q.output]))
    return max(lengths) + len(sep)


def token_episode(model, tok, task, truncate: bool = False, bos: bool = True) -> Episode:
    """A text task (context_tuning.Task: name, demos [(input, output)], queries) as an Episode: [BOS] x_1 y_1 \\n
    x_2 y_2 \\n ... (bos=False: without BOS); checks that context + the longest query fits in max_seq_len."""
    sep = newline_ids(tok)
    demos = [demo_ids(tok, x, y, sep) for x, y in task.demos]
    longest_query = longest_query_len(tok, task, sep)
    limit = model.cfg.max_seq_len

    def context_len():
        return int(bos) + sum(len(x) + len(y) for x, y in demos)
    if truncate:
        dropped = 0
        while len(demos) > 1 and context_len() + longest_query > limit:
            demos.pop(0)
            dropped += 1
        if dropped:
            print(f"warning: {task.name}: dropped the first {dropped} of {len(task.demos)} demonstrations to fit "
                  f"max_seq_len {limit} (--truncate-demos)", file=sys.stderr)
    if context_len() + longest_query > limit:
        raise ValueError(f"{task.name}: demonstrations take {context_len()} tokens and the longest query "
                         f"{longest_query}, more than the model's context ({limit}); use fewer/shorter demonstrations "
                         f"or --truncate-demos")
    return Episode(token_lead(model, tok.bos_id if bos else None), [token_demo(model, x + y, len(x)) for x, y in demos])


