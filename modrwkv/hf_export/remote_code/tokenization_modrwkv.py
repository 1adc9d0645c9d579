"""The RWKV "World" tokenizer for `transformers` (trust_remote_code), written by `modrwkv export --to hf`.

The encoding itself is ModRWKV's own tokenizer module, shipped beside this file as `world_tokenizer.py` (greedy
longest match over UTF-8 bytes; ids 1-65529 from the vocab file, 0 <|endoftext|>, 65530 <image>, 65531 <audio>,
65532 <series>), so ids equal the trained model's. transformers' slow-tokenizer API works on str tokens while
World tokens are byte strings that need not be valid UTF-8: each token is shown here as one character per byte
(latin-1), which maps bytes to str and back losslessly; decoding joins the bytes and reads them as UTF-8.
"""

import shutil
from pathlib import Path

from transformers import AddedToken, PreTrainedTokenizer

from .world_tokenizer import END_OF_TEXT, SPECIAL_TOKENS, VOCAB_FILENAME, WorldTokenizer


def as_token(data: bytes) -> str:
    return data.decode("latin-1")


# what a turn's text may hold as tokens in training (`TURN_SPECIALS`): "<|endoftext|>" written in a prompt is text
PLACEHOLDERS = [text for text, idx in SPECIAL_TOKENS.items() if idx != END_OF_TEXT]


class ModRWKVTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": VOCAB_FILENAME}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, **kwargs):
        self.vocab_file = vocab_file
        self.world = WorldTokenizer(vocab_file)
        self.token_ids = {as_token(data): idx for idx, data in self.world.id_to_bytes.items()}
        # the special tokens are split off before the byte-level match, as WorldTokenizer.encode(allow_special=True)
        self._added_tokens_decoder = {idx: AddedToken(text, special=True, normalized=False)
                                      for text, idx in SPECIAL_TOKENS.items()}
        kwargs.setdefault("eos_token", self.world.special_ids[END_OF_TEXT])
        kwargs.setdefault("pad_token", self.world.special_ids[END_OF_TEXT])
        kwargs.setdefault("clean_up_tokenization_spaces", False)  # decoded text is the bytes, untouched
        super().__init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        return self.world.vocab_size

    def get_vocab(self) -> dict[str, int]:
        return {**self.token_ids, **SPECIAL_TOKENS}

    def tokenize(self, text: str, **kwargs) -> list[str]:
        """As training reads a turn: the placeholders split off, all else bytes; transformers' own split would take
        the eos token's text, a literal "<|endoftext|>" in a question, for a document break."""
        return [self._convert_id_to_token(idx) for idx in self.world.encode(text, allow_special=PLACEHOLDERS)]

    def _convert_token_to_id(self, token: str) -> int:
        return self.token_ids[token]

    def _convert_id_to_token(self, index: int) -> str:
        return as_token(self.world.token_bytes(index))

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return b"".join(token.encode("latin-1") for token in tokens).decode("utf-8", errors="replace")

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        target = Path(save_directory) / f"{filename_prefix + '-' if filename_prefix else ''}{VOCAB_FILENAME}"
        if Path(self.vocab_file).resolve() != target.resolve():
            shutil.copyfile(self.vocab_file, target)
        return (str(target),)
