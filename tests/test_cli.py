import subprocess
import sys

import torch

from modrwkv import RWKV7Config
from modrwkv.cli import main
from tests.conftest import random_backbone


def test_help_lists_the_jobs():
    out = subprocess.run([sys.executable, "-m", "modrwkv.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("convert", "generate", "demo"):
        assert command in out.stdout


def test_convert_both_ways_and_generate(tmp_path, capsys):
    model = random_backbone(RWKV7Config(vocab_size=65536, n_layer=1, n_embd=64, head_size=32))
    torch.save(model.state_dict(), tmp_path / "m.pth")
    assert main(["convert", "--to", "fla", str(tmp_path / "m.pth"), str(tmp_path / "fla")]) == 0
    assert main(["convert", "--to", "rwkv", str(tmp_path / "fla"), str(tmp_path / "back.pth")]) == 0
    assert main(["generate", "--model", str(tmp_path / "back.pth"), "--prompt", "Hi", "--max-new-tokens", "3",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("wrote")


def test_bad_checkpoint_is_a_clear_cli_error(tmp_path, capsys):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    assert main(["generate", "--model", str(tmp_path / "junk.pth"), "--prompt", "x"]) == 2
    assert "junk.pth" in capsys.readouterr().err
