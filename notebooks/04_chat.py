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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/newllm-nb/newllm-nb/blob/main/notebooks/04_chat.ipynb)
#
# # 04 · Chat with what you trained
#
# The reply streams token by token. The whole conversation lives in **one context vector**: every new
# token costs the same however long the chat gets (the original re-encoded its window for each token).
# By default this loads the newest checkpoint from notebook 02; paste another path to use it instead.

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
# ## Load a checkpoint
# A checkpoint file or run folder (pre-filled with the latest from notebook 02), a shared model's folder, or
# anyone's model on the Hugging Face Hub by name: `owner/name`, or `owner/name@revision` for a branch, tag
# or commit. A hub model is downloaded once into the Hugging Face cache and checked like a local file.
# A model trained on WikiText-103 or TinyStories (01's *text corpus*, or `--dataset text`) chats the same way:
# its checkpoint carries its tokenizer; paste its run folder (`runs/text-...`).

# %%
import ipywidgets as w

from newllm_nb.notebook.live import latest_checkpoint

default = latest_checkpoint("dolly")  # latest_checkpoint("text"): the newest model trained on a text corpus
path_box = w.Text(value=str(default or ""), placeholder="path/to/best.safetensors or owner/name",
                  description="checkpoint",
                  layout=w.Layout(width="640px"))
path_box

# %%
from newllm_nb.train.checkpoint import load_model
from newllm_nb.config import preset
from newllm_nb.notebook.live import train_live

if path_box.value.strip():
    model, tokenizer, ckpt = load_model(path_box.value.strip())
    print("loaded", path_box.value.strip(), "| trained epochs:", len(ckpt.history), "| data:",
          ckpt.data_source or "not recorded")
else:
    print("No checkpoint from notebook 02 yet: training a small Dolly model so this notebook still works.")
    demo = train_live(preset("original_dolly", train__epochs=3, train__batch_size=32), "chat-demo")
    model, tokenizer = demo.model.cpu().eval(), demo.tokenizer

# %% [markdown]
# ## Chat
# Type below and press **Enter** (or Send); the sliders change sampling for the next reply, **New conversation**
# empties the context vector.

# %%
from newllm_nb.infer.generate import ChatSession
from newllm_nb.notebook.widgets import ChatPanel

chat = ChatPanel(ChatSession(model, tokenizer, temperature=0.7, top_k=40, max_new_tokens=60, seed=0))
chat

# %% [markdown]
# Headless (or just to see it work), the function Enter calls answers two fixed prompts, each in a
# conversation of its own, on a second panel that is not shown: the chat above stays yours.

# %%
from newllm_nb.notebook.live import text_table

demo_chat = ChatPanel(ChatSession(model, tokenizer, temperature=0.7, top_k=40, max_new_tokens=60,
                                  seed=0))
prompts = ["What does a river otter eat?", "Give me ideas for a weekend by the sea."]
replies = []
for p in prompts:
    demo_chat.reset()
    replies.append(demo_chat.ask(p, echo=False))
    print(f"context vector after one turn: {tuple(demo_chat.session.context.shape)}, "
          f"{demo_chat.session.tokens_read} tokens read")
text_table({"prompt": prompts, "reply": replies})
