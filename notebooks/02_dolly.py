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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/newllm-nb/newllm-nb/blob/main/notebooks/02_dolly.ipynb)
#
# # 02 · Instruction following on Dolly-15k
#
# Each example becomes `Instruction: … Context: … Response: …` (Context only when present), split
# 90/10 with seed 42 like the original. The original reached validation PPL 15.6 with **one** FNN layer.
# Offline, the bundled `data/dolly-sample.jsonl` (same schema, 8 categories) stands in.
#
# **Any instruction dataset** works too: give a hub name (or a local jsonl as the data source) and a field
# mapping, e.g. `context=input, response=output` for Alpaca-style sets. For scripts without spaces
# between words (Japanese, Chinese) pick the byte-level BPE tokenizer; `data/instruct-ja-sample.jsonl`
# is a small Japanese sample in that schema.

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
# ## Settings

# %%
from newllm_nb.notebook.widgets import TrainingPanel

panel = TrainingPanel("original_dolly")
panel

# %% [markdown]
# ## Train (reads the widgets' current values; re-running resumes)

# %%
from newllm_nb.notebook.live import train_live
from newllm_nb.notebook.plots import history_frame

cfg = panel.config()
result = train_live(cfg, "dolly", "New-LLM on Dolly-15k")

# %%
history_frame(result.history).tail(10)

# %% [markdown]
# ## Validation loss per instruction category
# Token-weighted over non-PAD targets, on the held-out 10% (the `category` field; Dolly has eight).

# %%
from newllm_nb.notebook.live import category_table

category_table(result.model, result.tokenizer, result.prepared.valid_records, cfg.data.max_seq_length)

# %% [markdown]
# ## Answers to held-out instructions

# %%
from newllm_nb.infer.generate import generate
from newllm_nb.notebook.live import instruction_prompt, text_table

held_out = result.prepared.valid_records[:4]
text_table([{"instruction": r["instruction"], "reference": r["response"],
             "model": generate(result.model, result.tokenizer, instruction_prompt(r["instruction"], r["context"]),
                               temperature=0.7, top_k=40, max_new_tokens=40, seed=0)} for r in held_out])

# %% [markdown]
# ## Share on the Hub
# Put the best weights on the Hugging Face Hub with their tokenizer and a model card (architecture and
# equations, data source, recipe, the validation figures with their token counts, the command that
# trains the run again). Anyone then loads the model by name, in notebook 04 or with
# `load_model("your-name/newllm-dolly")`. Sharing needs a token: `huggingface_hub.login()`, the `HF_TOKEN`
# variable, or in Colab an `HF_TOKEN` secret (the key icon on the left). Without one this cell only says
# how to log in. `python -m newllm_nb push --checkpoint PATH --repo OWNER/NAME --local-dir DIR` writes the
# same folder without uploading (docs/sharing.md).

# %%
from newllm_nb.train.hub import share_on_hub

HUB_REPO = ""  # e.g. "your-name/newllm-dolly"; empty: nothing is shared
share_on_hub(result.best_path, HUB_REPO)
