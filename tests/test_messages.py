"""Messages name the real cause: a corpus the 90/10 split leaves without training text says so (not "no line
with >= 5 words"); in chat, a blank line is skipped, not the end of the talk."""

import os
import subprocess
import sys

from newllm_nb.cli import main

from conftest import make_trainer, tiny_config


def test_a_one_line_corpus_names_the_split_that_left_training_empty(tmp_path, capsys):
    one = tmp_path / "one.txt"
    one.write_text("the only paragraph of this corpus has more than five words in it\n", encoding="utf-8")
    assert main(["train", "--preset", "smoke", "--data-path", str(one), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "has 1 line(s)" in err and "leaves training no text" in err and ">= 5 words" not in err, err


def test_a_blank_chat_line_is_skipped_not_the_end(tmp_path, tiny_prepared):
    make_trainer(tiny_config(train__epochs=1), tiny_prepared, tmp_path / "run").fit()
    r = subprocess.run([sys.executable, "-m", "newllm_nb", "chat", "--checkpoint", str(tmp_path / "run"),
                        "--max-tokens", "3", "--seed", "0"], input="   \n\nthe first\nthe second\n", text=True,
                       capture_output=True, timeout=120, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stdout.count("model:") == 2  # both messages answered; the blank lines before them asked again
