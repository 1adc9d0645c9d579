"""modrwkv/chat.py: a chat session's answers end where the trained turns end."""

import types

import torch

from modrwkv.chat import ChatSession
from modrwkv.conversation import IGNORE, Turn, prompt_ids, tokenize_conversation
from modrwkv.model import RWKV7State
from modrwkv.tokenizer import WorldTokenizer


class ScriptedBackbone(torch.nn.Module):
    """Emits `script` one token a call, as a model that learned those targets would (greedy)."""

    def __init__(self, script: list[int], vocab_size: int = 65536):
        super().__init__()
        self.emb = torch.nn.Embedding(1, 1)
        self.script, self.vocab_size, self.calls = script, vocab_size, 0

    def forward(self, ids, state=None, logits_to_keep=0, attention_mask=None):
        logits = torch.zeros(ids.shape[0], 1, self.vocab_size)
        logits[:, :, self.script[min(self.calls, len(self.script) - 1)]] = 1
        self.calls += 1
        return logits, RWKV7State(torch.zeros(1, ids.shape[0], 1), torch.zeros(1, ids.shape[0], 1, 1, 1),
                                  torch.zeros(1, ids.shape[0], 1))


def test_an_answer_ends_at_its_turn_end_when_that_is_split_across_tokens():
    tok = WorldTokenizer()
    turns = [Turn("user", "这是什么?"), Turn("assistant", "这是猫。"), Turn("user", "颜色?"), Turn("assistant", "白色。")]
    _, labels = tokenize_conversation(tok, turns, [])
    targets = [t for t in labels if t != IGNORE]  # what training taught the model to say after "Assistant:"
    assert [tok.decode([t]) for t in targets[3:6]] == ["猫", "。\n", "\n"]  # no single "\n\n" token ends it
    backbone = ScriptedBackbone(targets)
    session = ChatSession(types.SimpleNamespace(backbone=backbone, projectors={}), tok)
    backbone.calls = 0  # the session's prompt took a call
    assert session.ask("这是什么?") == "这是猫。"


def test_a_blank_line_inside_a_turn_is_trained_as_the_decoders_read_it():
    """A two-paragraph answer kept its "\\n\\n": training taught the model to go on after the very token every decoder
    stops at, so chat gave its first paragraph; a question's blank line read as the end of the user's turn."""
    tok = WorldTokenizer()
    answer = "A dog runs.\r\n\r\nIt is sunny.\n\n\n"
    _, labels = tokenize_conversation(tok, [Turn("user", "<image>\n\nDescribe it.\n"), Turn("assistant", answer)],
                                      [2])
    targets = [t for t in labels if t != IGNORE]
    assert tok.decode(targets) == " A dog runs.\nIt is sunny.\n\n"  # one turn end, at the end
    backbone = ScriptedBackbone(targets)
    session = ChatSession(types.SimpleNamespace(backbone=backbone, projectors={}), tok)
    backbone.calls = 0
    assert session.ask("Describe it.") == "A dog runs.\nIt is sunny."  # the whole answer, both paragraphs
    # the question as training lays it out, whatever its blank lines and line ends
    question = "What is this?\r\n\r\nAnswer briefly. "
    assert prompt_ids(tok, question, []) == session.prompt_ids + session.question_ids(question)
    assert tok.decode(session.question_ids(question)) == " What is this?\nAnswer briefly.\n\nAssistant:"
