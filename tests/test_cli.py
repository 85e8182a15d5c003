import os
import subprocess
import sys

from newllm_nb.cli import main


def test_main_command_trains_on_the_bundled_sample_offline(tmp_path):
    env = dict(os.environ, NEWLLM_SMOKE="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "newllm_nb", "train", "--dataset", "wikitext", "--run-dir",
                        str(tmp_path / "run"), "--quiet"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "using the bundled sample" in r.stdout
    assert "PPL" in r.stdout and "accuracy" in r.stdout
    assert (tmp_path / "run" / "best.safetensors").exists()


def test_bad_flag_value_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--layers", "0", "--run-dir", str(tmp_path)]) == 2
    assert "num_layers=0" in capsys.readouterr().err
    assert main(["train", "--dataset", "dolly", "--data-path", str(tmp_path / "missing.jsonl"),
                 "--run-dir", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err
