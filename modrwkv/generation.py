"""Text generation on the RNN state: prompts are prefilled in parallel, then decoded one token per step.

Memory stays constant while decoding: each step reads and writes the fixed-size state, never a growing cache.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .batching import right_pad
from .model import RWKV7, RWKV7State
from .tokenizer import END_OF_TEXT, WorldTokenizer


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    stop_tokens: tuple[int, ...] = (END_OF_TEXT,)
    seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class GenerationOutput:
    tokens: list[list[int]]  # new tokens per prompt, stop token excluded
    stopped: list[bool] = field(default_factory=list)  # True where a stop token ended the row
    state: RWKV7State | None = None  # after the last token fed to the model (rows in prompt order)


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> ids [B]: argmax for temperature 0, else nucleus sampling."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    # the largest logit made 0 first: at a tiny temperature the others overflow to -inf, never inf / inf (NaN)
    probs = torch.softmax((logits - logits.amax(dim=-1, keepdim=True)) / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def prefill(model: RWKV7, prompts: Sequence[Sequence[int]], state: RWKV7State | None = None):
    """Runs the prompts in one parallel pass; returns each row's last-position logits [B, V] and the state."""
    ids, mask, _ = right_pad(prompts, device=model.emb.weight.device)
    if bool(mask.all()):
        logits, state = model(ids, state=state, logits_to_keep=1)
        return logits[:, -1], state
    # the head on each row's last real position only: [B, V] logits, never [B, T, V] (gigabytes at T = 4096)
    hidden, state = model.forward_hidden(ids, state=state, attention_mask=mask)
    return model.head(hidden[torch.arange(len(prompts)), mask.sum(dim=1) - 1]), state


@torch.no_grad()
def generate(
    model: RWKV7,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig | None = None,
    state: RWKV7State | None = None,
    on_token: Callable[[int, int], None] | None = None,
    first_logits: torch.Tensor | None = None,
) -> GenerationOutput:
    """Generates for a batch of prompts (token id lists).

    state: a starting state for every row (e.g. a cached prefix), or None. on_token(row, token_id) is
    called as each token is produced (streaming); returning True ends that row there (the token is kept, the
    returned state has not read it). first_logits with state: skip the prefill, the state
    already holds the prompt (prefix reuse) and these are its last-position logits [B, V].
    """
    config = config or GenerationConfig()
    generator = None
    if config.seed is not None:
        generator = torch.Generator(device=model.emb.weight.device).manual_seed(config.seed)
    if first_logits is None:
        logits, state = prefill(model, prompts, state)
    else:
        if state is None:
            raise ValueError("first_logits needs the state it came from")
        logits = first_logits
    B = logits.shape[0]
    tokens: list[list[int]] = [[] for _ in range(B)]
    stopped = [False] * B
    final: dict[int, RWKV7State] = {}  # row -> state after its last returned token
    active = list(range(B))  # rows still generating, in the order of the rows of `state`
    stop = set(config.stop_tokens)
    for _ in range(config.max_new_tokens):
        next_ids = sample(logits, config.temperature, config.top_p, generator).tolist()
        keep = []
        for j, (row, tok) in enumerate(zip(active, next_ids)):
            if tok in stop:
                stopped[row] = True
                final[row] = state.select([j])
            else:
                tokens[row].append(tok)
                if on_token is not None and on_token(row, tok):
                    stopped[row] = True
                    final[row] = state.select([j])
                else:
                    keep.append(j)
        if not keep:
            active = []
            break
        if len(keep) < len(active):
            state = state.select(keep)
            active = [active[j] for j in keep]
        feed = torch.tensor([[next_ids[j]] for j in keep], device=logits.device)
        logits, state = model(feed, state=state, logits_to_keep=1)
        logits = logits[:, -1]
    for j, row in enumerate(active):
        final[row] = state.select([j])
    merged = RWKV7State(*(torch.cat([getattr(final[r], f) for r in range(B)], dim=1) for f in ("att_shift", "wkv", "ffn_shift")))
    return GenerationOutput(tokens=tokens, stopped=stopped, state=merged)


def generate_text(
    model: RWKV7,
    tokenizer: WorldTokenizer,
    prompt_ids: Sequence[int],
    config: GenerationConfig | None = None,
    on_text: Callable[[str], None] | None = None,
    state: RWKV7State | None = None,
    first_logits: torch.Tensor | None = None,
    stop_texts: Sequence[str] = (),
) -> str:
    """One prompt's continuation as text; on_text receives it piece by piece, in whole UTF-8 characters.
    Generation also ends at the first of `stop_texts` to appear, and the text is cut before it: on_text is never
    given a stop text, nor the start of one that may yet complete it."""
    decoder = tokenizer.stream_decoder()
    pieces, shown = [], 0

    def show(upto: int) -> None:
        nonlocal shown
        if on_text is not None and upto > shown:
            on_text("".join(pieces)[shown:upto])
            shown = upto

    def stream(_row: int, token: int) -> bool:
        pieces.append(decoder.push(token))
        text = "".join(pieces)
        cut = stop_at(text, stop_texts)
        show(cut if cut is not None else len(text) - open_stop(text, stop_texts))
        return cut is not None

    generate(model, [prompt_ids], config, state=state, on_token=stream, first_logits=first_logits)
    pieces.append(decoder.flush())
    text = "".join(pieces)
    text = text[: stop_at(text, stop_texts)]  # [:None]: all of it
    show(len(text))
    return text


def stop_at(text: str, stop_texts: Sequence[str]) -> int | None:
    """Where the first of `stop_texts` in `text` begins; None when none is in it."""
    return min([text.find(s) for s in stop_texts if s in text], default=None)


def open_stop(text: str, stop_texts: Sequence[str]) -> int:
    """How many of `text`'s last characters begin a stop text (held back: the next token may complete it)."""
    return max((n for s in stop_texts for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
