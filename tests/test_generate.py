import importlib
import types

import pytest
import torch

from newllm_nb import ModelConfig, NewLLM
from newllm_nb.config import EOS_ID
from newllm_nb.data.tokenizer import WordTokenizer
from newllm_nb.infer.generate import (
    ChatSession,
    Sampling,
    encode_prompt,
    generate,
    generate_batch,
    iter_tokens,
    pick_next,
    stream,
)

WORDS = ["the", "cat", "sat", "on", "mat", "instruction:", "response:", "a", "dog", "ran"]


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    tok = WordTokenizer(WORDS)
    model = NewLLM(ModelConfig(vocab_size=tok.vocab_size, embed_dim=16, context_dim=16, hidden_dim=32,
                                         num_layers=2, init_std=0.5)).eval()
    return model, tok


def test_streamed_logits_equal_one_full_forward(lm):
    model, tok = lm
    prompt = torch.tensor([encode_prompt(tok, "the cat sat")])
    toks, step_logits = [], []
    for t, logits, _ in iter_tokens(model, prompt, Sampling(max_new_tokens=12, temperature=1.0, seed=3)):
        toks.append(int(t))
        step_logits.append(logits[0])
    full = torch.cat([prompt, torch.tensor([toks])], 1)
    with torch.no_grad():
        ref, _ = model(full)
    P = prompt.shape[1]
    for i, lg in enumerate(step_logits):
        torch.testing.assert_close(lg, ref[0, P - 1 + i], rtol=1e-4, atol=1e-5)


def test_greedy_is_deterministic_and_top_k_1_equals_greedy(lm):
    model, tok = lm
    a = generate(model, tok, "the cat", greedy=True, max_new_tokens=20, stop=())
    b = generate(model, tok, "the cat", greedy=True, max_new_tokens=20, stop=())
    c = generate(model, tok, "the cat", top_k=1, temperature=1.3, max_new_tokens=20, stop=(), seed=123)
    assert a == b == c and len(a.split()) > 0
    s1 = generate(model, tok, "the cat", temperature=1.5, max_new_tokens=20, stop=(), seed=7)
    s2 = generate(model, tok, "the cat", temperature=1.5, max_new_tokens=20, stop=(), seed=7)
    assert s1 == s2


def test_pick_next_filters():
    logits = torch.tensor([[0.0, 0.0, 0.0, 1.0, 5.0, 4.0, -1.0]])
    s = Sampling(top_k=2, temperature=1.0, seed=0)
    g = torch.Generator().manual_seed(0)
    assert {int(pick_next(logits, s, generator=g)) for _ in range(50)} <= {4, 5}
    s = Sampling(top_p=0.5, temperature=1.0)
    assert {int(pick_next(logits, s, generator=g)) for _ in range(50)} == {4}
    seen = torch.zeros(1, 7, dtype=torch.bool)
    seen[0, 4] = True
    assert int(pick_next(logits, Sampling(greedy=True, repetition_penalty=2.0), seen)) == 5
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0)


def test_stop_conditions(lm):
    model, tok = lm
    # max tokens
    out = list(stream(model, tok, "the", max_new_tokens=5, greedy=True, stop=()))
    assert len("".join(out).split()) <= 5
    # EOS: a model whose head always prefers EOS stops at once
    eos_model = NewLLM(model.config).eval()
    with torch.no_grad():
        eos_model.head.bias.zero_()
        eos_model.head.bias[EOS_ID] = 100.0
    assert generate(eos_model, tok, "the cat", greedy=True) == ""
    # stop string: a model that always says "instruction:" after "the"
    st_model = NewLLM(model.config).eval()
    with torch.no_grad():
        st_model.head.bias.zero_()
        st_model.head.bias[tok.stoi["instruction:"]] = 100.0
    pieces = list(stream(st_model, tok, "the cat", greedy=True, max_new_tokens=30))
    assert "".join(pieces) == "" and "instruction" not in "".join(pieces)
    from newllm_nb.infer.generate import _TextAssembler

    asm = _TextAssembler(tok, ["Instruction:"])
    pieces = [asm.add(tok.stoi[w]) for w in ["the", "cat", "sat", "instruction:", "dog"] if not asm.stopped]
    assert "".join(pieces).strip() == "the cat sat" and asm.stopped


def test_batch_matches_single(lm):
    model, tok = lm
    prompts = ["the cat sat on", "a dog", "mat"]
    batch = generate_batch(model, tok, prompts, greedy=True, max_new_tokens=8, stop=())
    single = [generate(model, tok, p, greedy=True, max_new_tokens=8, stop=()) for p in prompts]
    assert batch == single


def test_chat_keeps_state_shape_and_accepts_any_text(lm):
    model, tok = lm
    chat = ChatSession(model, tok, max_new_tokens=6, seed=0)
    assert chat.send("   ") == ChatSession.EMPTY_MESSAGE and chat.context is None and chat.turns == []
    shapes = set()
    for msg in ["the cat", "🙂 émoji ünknown words", "dog " * 5000, "x" * 100_000, "sat on the mat"]:
        reply = chat.send(msg)
        assert isinstance(reply, str)
        shapes.add(tuple(chat.context.shape))
    assert shapes == {(1, 16)} and len(chat.turns) == 5
    assert chat.tokens_read > 5000
    ctx = chat.context.clone()
    chat.send("the dog")
    assert not torch.equal(ctx, chat.context)  # the conversation moved the state
    chat.reset()
    assert chat.context is None and chat.turns == []


def test_decode_ids_greedy_equals_streaming_greedy(lm):
    from newllm_nb.infer.generate import decode_ids

    model, tok = lm
    prompt = torch.tensor([encode_prompt(tok, "the cat sat"), encode_prompt(tok, "a dog ran")])
    ids = decode_ids(model, prompt, 40, use_graph=False)
    ref = torch.stack([t for t, _, _ in iter_tokens(model, prompt, Sampling(greedy=True, max_new_tokens=40))], 1)
    assert torch.equal(ids, ref)
    a = decode_ids(model, prompt, 30, temperature=1.0, seed=5, use_graph=False)
    b = decode_ids(model, prompt, 30, temperature=1.0, seed=5, use_graph=False)
    assert torch.equal(a, b) and not torch.equal(a, ids[:, :30])


def test_decode_ids_takes_the_weight_stationary_decoder_for_greedy_only(lm, monkeypatch):
    generate = importlib.import_module("newllm_nb.infer.generate")  # the module: the package exports a function
    model, tok = lm
    asked = []

    def spy(name):
        def decoder(m, batch_size, chunk=None, temperature=0.0):
            asked.append((name, batch_size))
            return types.SimpleNamespace(run=lambda p, n, seed=0: generate.decode_ids(
                m, p, n, temperature, seed, use_graph=False))
        return decoder
    monkeypatch.setattr(generate, "persistent_decoder", spy("persistent"))
    monkeypatch.setattr(generate, "graph_decoder", spy("graph"))
    prompt = torch.tensor([encode_prompt(tok, "the cat sat")])
    greedy = generate.decode_ids(model, prompt, 12, use_graph=True)
    assert asked == [("persistent", 1)] and torch.equal(greedy, generate.decode_ids(model, prompt, 12, use_graph=False))
    generate.decode_ids(model, prompt, 12, temperature=1.0, use_graph=True)
    assert asked[1:] == [("graph", 1)], "sampling is not the persistent decoder's: it decodes greedily only"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_decode_ids_cuda_graph_equals_eager(lm):
    from newllm_nb.infer.generate import decode_ids

    model, tok = lm
    model = NewLLM(model.config).cuda().eval()
    prompt = torch.tensor([encode_prompt(tok, "the cat sat")])
    g = decode_ids(model, prompt, 100, use_graph=True, chunk=16)
    e = decode_ids(model, prompt, 100, use_graph=False)
    assert torch.equal(g, e)


def test_transformer_kv_cache_step_equals_forward():
    from newllm_nb.models.baselines import TransformerLM

    torch.manual_seed(0)
    m = TransformerLM(ModelConfig(vocab_size=40, arch="transformer", tf_dim=16, tf_heads=4, tf_layers=2,
                                  max_len=32, dropout=0.0)).eval()
    ids = torch.randint(0, 40, (2, 10))
    with torch.no_grad():
        ref, _ = m(ids)
    cache = m.init_cache(2, 10)
    steps = torch.stack([m.decode_step(ids[:, t], cache) for t in range(10)], 1)
    torch.testing.assert_close(steps, ref, rtol=1e-4, atol=1e-5)


def test_baseline_models_get_a_clear_error(lm):
    from newllm_nb.models.baselines import LSTMLM

    _, tok = lm
    lstm = LSTMLM(ModelConfig(vocab_size=tok.vocab_size, embed_dim=8, lstm_hidden=8, arch="lstm"))
    with pytest.raises(ValueError, match="needs a New-LLM model.*LSTMLM"):
        ChatSession(lstm, tok)
    with pytest.raises(ValueError, match="needs a New-LLM model"):
        generate(lstm, tok, "the cat")
