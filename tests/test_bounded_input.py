"""Only regular files (or folders of them) are read, their size is checked before a byte is read, and
preparing text stays within a small, measured multiple of its size."""

import os
import subprocess
import sys
import textwrap

import pytest

from newllm_nb.data.sources import WIKITEXT_SAMPLE
from newllm_nb.runtime.files import PREPARE_MEMORY_MULTIPLE

SMOKE = ["-m", "newllm_nb", "train", "--preset", "smoke", "--epochs", "1", "--quiet", "--device", "cpu"]


def _cli(tmp_path, data_path, **env):
    r = subprocess.run([sys.executable, *SMOKE, "--data-path", str(data_path), "--run-dir", str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **env))
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_named_pipe_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "text.txt"
    os.mkfifo(fifo)
    assert "is a named pipe (FIFO)" in _cli(tmp_path, fifo)
    folder = tmp_path / "corpus"
    folder.mkdir()
    os.mkfifo(folder / "wiki.train.raw")  # a folder of files: each one is checked
    assert "is a named pipe (FIFO)" in _cli(tmp_path, folder)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_a_device_is_refused_before_it_eats_memory(tmp_path):
    assert "/dev/zero is a character device" in _cli(tmp_path, "/dev/zero")


def test_a_link_to_a_regular_file_is_read(tmp_path):
    from newllm_nb.data.sources import load_wikitext, read_text

    link = tmp_path / "linked.txt"
    link.symlink_to(WIKITEXT_SAMPLE / "wiki.train.raw")
    assert read_text(link) == read_text(WIKITEXT_SAMPLE / "wiki.train.raw")
    assert load_wikitext(link).train


def test_a_file_over_the_limit_is_refused_before_it_is_read(tmp_path):
    """A sparse 2 GB file: refused by its size, and the process never holds it (peak memory stays small)."""
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:
        f.truncate(2 * 10**9)
    code = textwrap.dedent(f"""
        import resource, sys
        from newllm_nb.cli import main
        code = main({[*SMOKE[2:], "--data-path", str(big), "--run-dir", str(tmp_path / "run")]!r})
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        sys.exit(code)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, HF_HUB_OFFLINE="1", NEWLLM_MAX_TEXT_BYTES="1e9"))
    assert r.returncode == 2, r.stderr
    assert "is 2.0 GB" in r.stderr and "1.0 GB this machine allows" in r.stderr and "NEWLLM_MAX_TEXT_BYTES" in r.stderr
    assert int(r.stdout.split()[-1]) < 10**9  # never read: the imports alone, far below the file's 2 GB


MEASURE = """
import os, sys
from newllm_nb import preset
from newllm_nb.data import prepare


def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


cfg = preset("smoke", data__max_examples=None, data__mode=sys.argv[2], data__path=sys.argv[1], model__vocab_size=1000)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) starts again from now
before = status("VmRSS")
prepare(cfg.data, 1000)
print((status("VmHWM") - before) / os.path.getsize(sys.argv[1]))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="measures the peak through /proc (Linux)")
@pytest.mark.parametrize("mode", ["windows", "stream"])
def test_memory_while_preparing_stays_within_a_small_multiple_of_the_text(tmp_path, mode):
    sample = (WIKITEXT_SAMPLE / "wiki.train.raw").read_text(encoding="utf-8")
    text = tmp_path / "text.txt"
    text.write_text(sample * (8 * 10**6 // len(sample) + 1), encoding="utf-8")  # about 8 MB
    r = subprocess.run([sys.executable, "-c", MEASURE, str(text), mode], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, r.stderr
    multiple = float(r.stdout.split()[-1])
    print(f"{mode}: peak memory while preparing = {multiple:.1f} x the text's size")
    assert multiple < PREPARE_MEMORY_MULTIPLE
