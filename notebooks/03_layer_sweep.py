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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/newllm-nb/newllm-nb/blob/main/notebooks/03_layer_sweep.ipynb)
#
# # 03 · Layer sweep: does depth help New-LLM?
#
# The original trained 1, 4, 5, 6 and 7 FNN layers on WikiText-2 and found almost no difference
# (PPL 20.1–21.8). Here the same sweep runs on this machine, optionally beside an LSTM and a causal
# Transformer **sized to the same parameter count**. Each finished run is saved; re-running this
# notebook skips finished runs, so a disconnect loses at most the run in progress.

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
from IPython.display import display

from newllm_nb.notebook.widgets import TrainingPanel, choice_boxes

panel = TrainingPanel("original_wikitext", hide=("layers",))  # the layer count comes from the checkboxes below
layer_row, chosen_layers = choice_boxes(list(range(1, 9)), [1, 4, 5, 6, 7], "FNN layers")
arch_row, chosen_archs = choice_boxes(["newllm", "lstm", "transformer"], ["newllm"], "model families")
display(panel.widget, layer_row, arch_row)

# %% [markdown]
# ## Run the sweep (reads the widgets' current values)

# %%
from newllm_nb.notebook.live import sweep_live

results = sweep_live(panel.config(), chosen_layers(), chosen_archs())

# %% [markdown]
# ## Results beside the original's published table
# Ours: token-weighted PPL over non-PAD targets on this run's validation data. The original's: WikiText-2
# validation, per-batch averages; the two stand side by side, they are not the same measurement.

# %%
from newllm_nb.notebook.plots import ORIGINAL_SWEEP, plot_sweep

results.merge(ORIGINAL_SWEEP, on="layers", how="left")

# %%
plot_sweep(results)

# %% [markdown]
# ## Sweep one cell option
# The same panel's settings with one of New-LLM's cell options (off = the original's cell) set to each value in
# turn, one run per value. Which options help at vocab 10000 on real WikiText-2 text, and by how much, is
# measured in `benchmarks/RESULTS.md` (the dev-set screen of the cell options).

# %%
import ipywidgets as w
from newllm_nb.notebook.live import CELL_OPTIONS

option = w.Dropdown(options=list(CELL_OPTIONS), value="state_norm", description="cell option",
                    style={"description_width": "140px"})
option_layers = w.IntSlider(value=1, min=1, max=8, description="FNN layers", style={"description_width": "140px"})
display(w.VBox([option, option_layers]))

# %%
from newllm_nb.notebook.live import option_sweep_live

values = CELL_OPTIONS[option.value][:2] if SMOKE else CELL_OPTIONS[option.value]
by_option = option_sweep_live(panel.config(), option.value, values, layers=option_layers.value)
by_option[["option", "value", "params", "best_val_ppl", "val_acc_%", "epochs", "data"]]
