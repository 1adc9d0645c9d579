"""Chat about one image / audio clip / series: its features enter the RNN state once, then every question
starts from a copy of that state. Memory stays constant however long the conversation grows."""

from collections.abc import Callable

import torch

from .conversation import PLACEHOLDERS, ROLES, TURN_END, expand_placeholders, prompt_ids, turn_text
from .generation import GenerationConfig, generate_text
from .multimodal import Features, ModRWKV
from .tokenizer import END_OF_TEXT, WorldTokenizer


class ChatSession:
    """One user turn about some media, then questions. Media can also arrive piece by piece with `add` (e.g.
    streaming audio, chunk after chunk): each piece's features enter the carried state as it comes."""

    def __init__(self, model: ModRWKV, tokenizer: WorldTokenizer, media: Features = (),
                 config: GenerationConfig | None = None):
        self.model, self.tokenizer = model, tokenizer
        stop = tuple(tokenizer.encode(TURN_END)) + (END_OF_TEXT,)
        self.config = config or GenerationConfig(max_new_tokens=128, temperature=0, stop_tokens=stop)
        self.prompt_ids, self.items = tokenizer.encode(f"{ROLES['user']}:"), 0
        with torch.no_grad():
            _, self.media_state = model.backbone(torch.tensor([self.prompt_ids]), logits_to_keep=1)
        for modality, features in media:
            self.add(modality, features)

    @torch.no_grad()
    def add(self, modality: str, features: torch.Tensor) -> None:
        """Appends one item ("<modality>" expanded to its feature count) to the user turn, in the state: the
        first after "User: ", as training places it; each later one right after the one before, so that the chunks
        of a streamed clip make one run of features, as the whole clip does in training, where its projector's
        compression windows do not overlap (stride = kernel, or none): with kernel 3 and stride 2 a chunk's edge
        loses the window across it (and a WaveNet pads each chunk's start anew)."""
        if modality not in self.model.projectors:
            raise ValueError(f"this model has no {modality} projector (it has: {sorted(self.model.projectors)})")
        # WaveNet keeps the series length, so the projector's compression alone sets the count
        projector = self.model.config.projectors[modality]
        n = projector.compressed_length(features.shape[0])
        if n == 0:  # as training skips such a sample (TooShort), named rather than failing inside the projector
            raise ValueError(f"this {modality} item has {features.shape[0]} feature vectors, none left after the "
                             f"projector's compression (kernel {projector.kernel})")
        text = f"{' ' if not self.items else ''}<{modality}>"
        ids, _ = expand_placeholders(self.tokenizer.encode(text, allow_special=True), [n], "chat")
        _, self.media_state = self.model.prefill(torch.tensor([ids]), [[(modality, features)]], state=self.media_state)
        self.prompt_ids += ids
        self.items += 1

    def question_ids(self, question: str) -> list[int]:
        """What follows the media in the prompt: `prompt_ids + question_ids(q)` is training's user turn, "User:
        <media>\n{q}\n\nAssistant:", or "User: {q}\n\nAssistant:" without media."""
        separator = "\n" if self.items else " "
        return self.tokenizer.encode(f"{separator}{turn_text(question)}{TURN_END}{ROLES['assistant']}:")

    @torch.no_grad()
    def ask(self, question: str, on_text: Callable[[str], None] | None = None) -> str:
        """One answer, from a fresh copy of the media state (earlier questions do not leak into it)."""
        ids = self.question_ids(question)
        # the answer's closing "\n\n" is not always one token ("。\n" then "\n"): the text ends the turn too
        text = generate_text(self.model.backbone, self.tokenizer, ids, self.config, on_text=on_text,
                             state=self.media_state.clone(), stop_texts=(TURN_END,))
        return text.strip()


@torch.no_grad()
def forecast_series(model: ModRWKV, tokenizer: WorldTokenizer, question: str, features: torch.Tensor,
                    lookback: torch.Tensor, mean: float, std: float) -> list[float]:
    """The forecast head's horizon for one series window, in the series' own units. The prompt is the user turn a
    forecasting sample trains on (the question, after "<series>\\n" unless it places it); lookback: the window
    normalised as its features were, whose mean and std undo the normalisation."""
    if model.forecast_head is None:
        raise ValueError("this model has no forecast head (it was trained without a forecast_horizon)")
    placeholder = PLACEHOLDERS["series"]
    text = question if placeholder in question else f"{placeholder}\n{question}"
    n = model.config.projectors["series"].compressed_length(features.shape[0])
    device = model.backbone.emb.weight.device
    # the question's own text is text (as `ChatSession.ask` reads it): only its series placeholder is one
    ids = torch.tensor([prompt_ids(tokenizer, text, [n], "forecast", specials={placeholder})], device=device)
    # no logits: a [1, T, vocab] head output nobody reads, 0.26 MB a position
    output = model(ids, [[("series", features.to(device))]], series_lookback=lookback[None].float().to(device),
                   return_logits=False)
    return (output.forecast[0].float().cpu() * std + mean).tolist()
