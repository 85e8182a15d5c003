# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/newllm-nb/newllm-nb/blob/main/notebooks/00_setup.ipynb)
#
# # 00 · Setup and GPU detection
#
# What this runtime is, what batch size / learning rate / precision suit it, and how fast New-LLM
# trains here. The recommendation follows the original's GPU table (batch 512 on T4, 2048 on L4,
# 4096 on A100 and H100) and its rule lr = 1e-4 · √(batch / 32).

# %% Colab set-up in one line: clone + install this repo, then only the packages Colab lacks (does nothing locally)
import sys
import subprocess
if "google.colab" in sys.modules: subprocess.run("[ -d newllm-nb ] || git clone -q --depth 1 https://github.com/newllm-nb/newllm-nb newllm-nb; pip install -q --no-deps ./newllm-nb && python -m newllm_nb.notebook.colab", shell=True, check=True)

# %%
from IPython.display import display
from newllm_nb import is_smoke
from newllm_nb.notebook import colab

display(colab.drive_checkbox())  # default off; ticking it mounts Drive and checkpoints go there
SMOKE = is_smoke()  # NEWLLM_SMOKE=1 (set by the tests): tiny data, <= 2 epochs, every cell still runs
print("smoke mode" if SMOKE else "full run", "| runs folder:", colab.runs_root())

# %% [markdown]
# ## This machine

# %%
import pandas as pd
import torch

from newllm_nb.runtime import hardware

info = hardware.detect()
rec = hardware.recommend(info)
pd.DataFrame([info.as_dict()]).T.rename(columns={0: "this machine"})

# %% [markdown]
# ## Recommendation beside the original's table

# %%
table = pd.DataFrame(hardware.original_table()).assign(source="original")
mine = pd.DataFrame([{"gpu": f"{info.kind} (this machine)", "batch_size": rec.batch_size, "lr": round(rec.lr, 6),
                      "source": f"recommended, precision {rec.precision}"}])
pd.concat([table, mine], ignore_index=True)

# %% [markdown]
# ## Package versions

# %%
import importlib.metadata as md

names = ["torch", "ipywidgets", "datasets", "pandas", "matplotlib", "tqdm", "safetensors", "tokenizers", "newllm-nb"]


def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "not installed"


pd.DataFrame({"package": names, "version": [version(n) for n in names]}).set_index("package")

# %% [markdown]
# ## Throughput probe
#
# A few real training steps (forward, backward, clipping, Adam) on random tokens, through the same
# step the trainer uses: on a CUDA GPU that is the CUDA-graph fast path, on CPU the eager loop.

# %%
from newllm_nb import ModelConfig
from newllm_nb.experiments.bench import probe_throughput

batch = 8 if SMOKE else rec.batch_size
rows = []
for layers, seq in [(1, 127), (4, 63)]:
    r = probe_throughput(ModelConfig(num_layers=layers), batch, 15 if SMOKE else seq, steps=2 if SMOKE else 10)
    rows.append({"config": f"L{layers}, T={seq}", "batch": batch, **r})
pd.DataFrame(rows).round(2)
