"""The demo's backbone: a tiny RWKV-7 standing in for the pretrained instruct LM that ModRWKV starts from.

With no downloads there is no such LM, and a backbone that has only seen plain text gives phase I nothing to
align to: the frozen model does not follow the chat template or answer from its context, so the adapters
cannot learn to "speak" to it. In about two minutes on a CPU this one learns
- language modelling on the Zen of Python, and
- text-only instruction turns in the demo's template whose answer is read from the user's turn: a word or a
  digit word ("User: seven\\nWhat digit is this?" -> "seven"), three English digit words or three Mandarin
  digits after the ASR prompts.
It never sees an image, a sound or a series: mapping those to words is left to the adapters (phase I) and
the joint fine-tune (phase II), as in the paper.
"""

import hashlib
import importlib
import json
import random
from pathlib import Path

import torch

from modrwkv import RWKV7, RWKV7Config
from modrwkv.conversation import Turn, prompt_ids
from modrwkv.generation import GenerationConfig, generate_text
from modrwkv.tokenizer import WorldTokenizer
from preprocessing.demo_data import HANZI, QUESTION, WORDS
from preprocessing.readers.asr import PROMPTS

from .text_pretrain import bundled_text, train_on_chats

TINY = RWKV7Config(vocab_size=65536, n_layer=2, n_embd=128, head_size=32)


def context_questions(seed: int = 0):
    """An endless supply of instruction turns whose answer is copied from the user's turn."""
    rng = random.Random(seed)
    zen_words = sorted({w.strip(".,!*'-").lower() for w in bundled_text().split()} - {""})
    digit_question = QUESTION.replace("<image>", "{}")

    def sample() -> list[Turn]:
        kind = rng.randrange(4)
        if kind == 0:
            context, question = rng.choice(WORDS), digit_question
        elif kind == 1:
            context, question = rng.choice(zen_words), "{}\nWhat word is this?"
        elif kind == 2:
            context, question = " ".join(rng.choices(WORDS, k=3)), "{}\n" + PROMPTS["en"]
        else:
            context, question = "".join(rng.choices(HANZI, k=3)), "{}\n" + PROMPTS["zh"]
        return [Turn("user", question.format(context)), Turn("assistant", context)]

    return sample


# the modules whose code decides what the demo backbone learns: its data, its prompts, the chat template and
# tokenizer that lay them out, and its training loop with the optimizer step it runs
RECIPE_MODULES = (__name__, "pipelines.text_pretrain", "preprocessing.demo_data", "preprocessing.readers.asr",
                  "modrwkv.conversation", "modrwkv.tokenizer", "pipelines.trainer")


def recipe(steps: int) -> dict:
    """What the demo backbone is made from, recorded beside it: a folder another recipe made (an older TINY, other
    steps, a change to the code of `RECIPE_MODULES`) is made again rather than reused."""
    modules = (importlib.import_module(name) for name in RECIPE_MODULES)
    code = hashlib.sha256(b"".join(Path(module.__file__).read_bytes() for module in modules))
    return {"config": TINY.to_dict(), "steps": steps, "code": code.hexdigest()}


def pretrained_backbone(path: Path, steps: int = 200, say=print, device: str = "cpu") -> Path:
    record = path / "recipe.json"
    if (path / "model.safetensors").is_file() and record.is_file() and json.loads(record.read_text()) == recipe(steps):
        return path
    tokenizer = WorldTokenizer()
    torch.manual_seed(0)
    model = RWKV7(TINY).init_weights().to(device)
    losses = train_on_chats(model, tokenizer, tokenizer.encode(bundled_text()), context_questions(), steps=steps,
                            text_batch=1, progress=True)
    model.save_pretrained(path)
    record.write_text(json.dumps(recipe(steps)))
    greedy = GenerationConfig(max_new_tokens=8, temperature=0)
    prompt = "four\nWhat digit is this?"
    answer = generate_text(model, tokenizer, prompt_ids(tokenizer, prompt, []), greedy)
    say(f"backbone: text loss {losses[0][0]:.2f} -> {losses[-1][0]:.2f}, instruction loss {losses[0][1]:.2f} -> "
        f"{losses[-1][1]:.2f}; asked {prompt!r} it answers {answer.split(chr(10))[0]!r}")
    return path
