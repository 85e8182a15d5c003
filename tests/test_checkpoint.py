import dataclasses
import os

import pytest
import torch

from newllm_nb import ModelConfig, NewLLM, RunConfig
from newllm_nb.data.tokenizer import WordTokenizer
from newllm_nb.train.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint

CFG = RunConfig(model=ModelConfig(vocab_size=20, embed_dim=8, context_dim=8, hidden_dim=16))


def _save(tmp_path, model=None, **kw):
    model = model or NewLLM(CFG.model)
    tok = WordTokenizer([f"w{i}" for i in range(16)])
    return save_checkpoint(tmp_path / "ck.safetensors", model, config=CFG.to_dict(), tokenizer=tok, **kw), model


def test_round_trip_and_atomic_no_temp_left(tmp_path):
    path, model = _save(tmp_path, history=[{"epoch": 1}])
    again, tok, ck = load_model(path)
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    assert tok.vocab_size == 20 and ck.history == [{"epoch": 1}]
    assert sorted(os.listdir(tmp_path)) == ["ck.safetensors"]


def test_missing_truncated_foreign_and_mismatched(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "none.safetensors")
    path, _ = _save(tmp_path)
    data = path.read_bytes()
    trunc = tmp_path / "truncated.safetensors"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.safetensors.*truncated or foreign"):
        load_checkpoint(trunc)
    foreign = tmp_path / "foreign.pt"
    torch.save({"a": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="foreign.pt"):
        load_checkpoint(foreign)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="not a newllm_nb checkpoint"):
        load_checkpoint(tmp_path / "plain.safetensors")
    bigger = NewLLM(dataclasses.replace(CFG.model, vocab_size=30))
    with pytest.raises(CheckpointError, match=r"ck.safetensors does not fit.*embed.weight: checkpoint \(20, 8\)"):
        load_checkpoint(path).load_into(bigger)
    deeper = NewLLM(dataclasses.replace(CFG.model, num_layers=2))
    with pytest.raises(CheckpointError, match="missing fnn.1.weight"):
        load_checkpoint(path).load_into(deeper)


def test_optimizer_state_round_trips(tmp_path):
    model = NewLLM(CFG.model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randint(0, 20, (2, 4)))[0].sum().backward()
    opt.step()
    path, _ = _save(tmp_path, model=model, optimizer=opt)
    opt2 = torch.optim.Adam(NewLLM(CFG.model).parameters(), lr=1e-3)
    opt2.load_state_dict(load_checkpoint(path).optimizer_state())
    for k, v in opt.state_dict()["state"][0].items():
        assert torch.equal(v, opt2.state_dict()["state"][0][k])
