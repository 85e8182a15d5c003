import os
import subprocess
import sys

from newllm_nb.cli import main


def test_main_command_trains_on_the_bundled_sample_offline_and_every_result_says_so(tmp_path):
    from newllm_nb.train.checkpoint import load_checkpoint

    env = dict(os.environ, NEWLLM_SMOKE="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "newllm_nb", "train", "--dataset", "wikitext", "--quiet"],
                       capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    sample = "bundled sample data/wikitext-sample (not WikiText-2)"
    assert f"offline mode is set (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE): training on the {sample}" in r.stdout
    final = [line for line in r.stdout.splitlines() if line.startswith("final")]
    assert final and "PPL" in final[0] and final[0].endswith(f"| data: {sample}")
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("wikitext-sample-newllm-L4-")  # the folder's name marks the sample too
    assert load_checkpoint(run / "best.safetensors").data_source == sample


def test_bad_flag_value_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--layers", "0", "--run-dir", str(tmp_path)]) == 2
    assert "num_layers=0" in capsys.readouterr().err
    assert main(["train", "--dataset", "dolly", "--data-path", str(tmp_path / "missing.jsonl"),
                 "--run-dir", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err


def test_every_flag_sets_its_config_field():
    from newllm_nb.cli import _parser, config_from_args

    args = _parser().parse_args(["train", "--dataset", "dolly", "--layers", "3", "--epochs", "7", "--batch-size", "24",
                                 "--lr", "0.002", "--seq-len", "48", "--vocab-size", "700", "--patience", "4",
                                 "--precision", "fp32", "--tokenizer", "bpe", "--mode", "packed", "--data-path",
                                 "x.jsonl", "--device", "cpu", "--original-metrics", "--quiet"])
    cfg = config_from_args(args, recommended_batch=512)
    m, d, t = cfg.model, cfg.data, cfg.train
    assert (m.num_layers, m.vocab_size) == (3, 700)
    assert (d.dataset, d.max_seq_length, d.tokenizer, d.mode, d.path) == ("dolly", 48, "bpe", "packed", "x.jsonl")
    assert (t.epochs, t.batch_size, t.lr, t.patience, t.precision, t.device) == (7, 24, 0.002, 4, "fp32", "cpu")
    assert t.original_metrics and not t.show_progress
    # Not given: the preset's values, the original preset's batch from this machine's recommendation.
    plain = config_from_args(_parser().parse_args(["train"]), recommended_batch=512)
    assert plain.train.batch_size == 512 and plain.model.num_layers == 4 and plain.train.lr is None
    best = config_from_args(_parser().parse_args(["train", "--preset", "best_wikitext"]), recommended_batch=512)
    assert best.train.batch_size == 16  # a measured recipe keeps its batch
    lstm = config_from_args(_parser().parse_args(["train", "--arch", "lstm"]), recommended_batch=512)
    assert lstm.model.arch == "lstm" and lstm.model.lstm_hidden > 0
    smoke = config_from_args(_parser().parse_args(["train", "--smoke"]), recommended_batch=512)
    assert smoke.train.epochs == 2 and smoke.data.max_examples == 120


def test_a_batch_size_of_zero_is_refused(tmp_path, capsys):
    assert main(["train", "--batch-size", "0", "--run-dir", str(tmp_path)]) == 2
    assert "batch_size=0" in capsys.readouterr().err
