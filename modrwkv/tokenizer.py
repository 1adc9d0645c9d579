"""The RWKV "World" tokenizer: greedy longest match over UTF-8 bytes, vocabulary 65536.

Ids 1-65529 come from the vocab file shipped in the `rwkv` PyPI package (`rwkv/rwkv_vocab_v20230424.txt`,
one `id repr(token) byte_length` per line). The rest are ours:

    0              <|endoftext|>  end of document; generation stops on it by default
    65530          <image>        placeholder replaced by image features
    65531          <audio>        placeholder replaced by audio features
    65532          <series>       placeholder replaced by time-series features
    65533..65535   reserved
"""

import codecs
import functools
import importlib.util
from collections.abc import Collection
from pathlib import Path

VOCAB_SIZE = 65536
END_OF_TEXT = 0
SPECIAL_TOKENS = {"<|endoftext|>": END_OF_TEXT, "<image>": 65530, "<audio>": 65531, "<series>": 65532}
VOCAB_FILENAME = "rwkv_vocab_v20230424.txt"


def default_vocab_path() -> Path:
    spec = importlib.util.find_spec("rwkv")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the `rwkv` package (which ships {VOCAB_FILENAME}) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / VOCAB_FILENAME


def parse_literal(literal: str) -> str | bytes:
    """A vocab entry's Python literal as `repr` writes it: '...' or "..." (text), b'...' or b"..." (bytes).
    Decoded here rather than by ast.literal_eval: CPython 3.11's AST builder counts its recursion depth in state
    the interpreter's threads share, and 65k parses in a process whose other threads parse too can fail with a
    spurious SystemError ("AST constructor recursion depth mismatch"; seen in this suite, loading the tokenizer
    beside a Ray Train run)."""
    is_bytes = literal[:1] == "b"
    quoted = literal[1:] if is_bytes else literal
    if len(quoted) < 2 or quoted[0] != quoted[-1] or quoted[0] not in "'\"":
        raise ValueError(f"not a quoted literal: {literal}")
    body = quoted[1:-1]
    if is_bytes:  # ASCII with escapes: \xNN to U+00NN, which latin-1 turns back into the byte NN
        return body.encode("ascii").decode("unicode_escape").encode("latin-1")
    if "\\" not in body:  # most of the 65k lines
        return body
    # the text's own characters kept as they are (latin-1, or escaped for the decoder), its escapes decoded
    return body.encode("latin-1", "backslashreplace").decode("unicode_escape")


@functools.cache
def read_vocab(path: Path) -> tuple[dict[int, bytes], dict]:
    """A vocab file's tokens by id and their trie (dicts: byte -> child node; the key None holds the id of the token
    ending at that node). Read once per process: tokenizers share them, and nothing changes them."""
    id_to_bytes: dict[int, bytes] = {}
    trie: dict = {}
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            idx_str, rest = line.split(" ", 1)
            literal, length = rest.rsplit(" ", 1)
            token = parse_literal(literal)
        except ValueError as e:
            raise ValueError(f"{path}:{line_no}: not a vocab line ({e})") from e
        token = token.encode("utf-8") if isinstance(token, str) else token
        if not isinstance(token, bytes) or len(token) != int(length):
            raise ValueError(f"{path}:{line_no}: token length does not match the stated {length}")
        idx = int(idx_str)
        id_to_bytes[idx] = token
        node = trie
        for byte in token:
            node = node.setdefault(byte, {})
        node[None] = idx
    return id_to_bytes, trie


class WorldTokenizer:
    def __init__(self, vocab_path=None):
        # resolved: one reading per file, however it is named (a venv behind a symlink, a relative path)
        self.id_to_bytes, self._trie = read_vocab(Path(vocab_path or default_vocab_path()).resolve())
        self.special_tokens = dict(SPECIAL_TOKENS)
        self.special_ids = {v: k for k, v in self.special_tokens.items()}
        self.vocab_size = VOCAB_SIZE

    def encode_bytes(self, data: bytes) -> list[int]:
        ids, pos, n, root = [], 0, len(data), self._trie
        while pos < n:
            node, best_id, best_end, i = root, None, pos, pos
            while i < n:
                node = node.get(data[i])
                if node is None:
                    break
                i += 1
                if None in node:
                    best_id, best_end = node[None], i
            if best_id is None:  # every single byte is in the vocabulary, so this means a broken vocab file
                raise ValueError(f"byte {data[pos]:#x} at offset {pos} has no token")
            ids.append(best_id)
            pos = best_end
        return ids

    def encode(self, text: str, allow_special: bool | Collection[str] = False) -> list[int]:
        """Text to ids. With allow_special, the literal strings of SPECIAL_TOKENS (True) or of those it names become
        their ids; any other is text."""
        specials = [s for s in self.special_tokens if allow_special is True or s in (allow_special or ())]
        if not specials:
            return self.encode_bytes(text.encode("utf-8"))
        ids, rest = [], text
        while rest:
            hits = [(rest.find(s), s) for s in specials if s in rest]
            if not hits:
                ids += self.encode_bytes(rest.encode("utf-8"))
                break
            at, special = min(hits)
            ids += self.encode_bytes(rest[:at].encode("utf-8"))
            ids.append(self.special_tokens[special])
            rest = rest[at + len(special):]
        return ids

    def token_bytes(self, idx: int) -> bytes:
        if idx in self.id_to_bytes:
            return self.id_to_bytes[idx]
        if idx in self.special_ids:
            return self.special_ids[idx].encode("utf-8") if idx != END_OF_TEXT else b""
        if 0 <= idx < self.vocab_size:
            return b""  # reserved ids decode to nothing
        raise ValueError(f"token id {idx} is outside the vocabulary [0, {self.vocab_size})")

    def decode(self, ids, errors: str = "replace") -> str:
        return b"".join(self.token_bytes(int(i)) for i in ids).decode("utf-8", errors=errors)

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Turns ids into text piece by piece, holding back bytes until they form whole UTF-8 characters."""

    def __init__(self, tokenizer: WorldTokenizer):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, idx: int) -> str:
        return self._utf8.decode(self.tokenizer.token_bytes(idx))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
