import pytest

from newllm_nb.data.tokenizer import BPETokenizer, WordTokenizer, load_tokenizer, save_tokenizer, tokenizer_from_json

TEXTS = ["The cat sat on the mat .", "the dog sat on the log .", "A cat and a dog ."]


def test_word_tokenizer_original_rules(tmp_path):
    tok = WordTokenizer.train(TEXTS, vocab_size=8)
    assert tok.vocab_size == 8
    assert tok.itos[:4] == ["<pad>", "<unk>", "<bos>", "<eos>"]
    # Most frequent first (the 4, "." 3), ties in order of first appearance (cat before sat).
    assert tok.itos[4:] == ["the", ".", "cat", "sat"]
    ids = tok.encode("THE Sat zebra")
    assert ids[0] == 2 and ids[-1] == 3 and ids[3] == 1  # BOS, lowercased words, UNK, EOS
    assert tok.decode(ids) == "the sat <unk>"
    save_tokenizer(tok, tmp_path / "tok.json")
    again = load_tokenizer(tmp_path / "tok.json")
    assert again.itos == tok.itos and again.encode("a cat .") == tok.encode("a cat .")


def test_word_round_trip_of_in_vocabulary_text():
    tok = WordTokenizer.train(TEXTS, vocab_size=100)
    text = "the dog sat on the mat ."
    assert tok.decode(tok.encode(text)) == text


def test_bpe_round_trip_including_non_latin_and_emoji():
    texts = TEXTS + ["東京は日本の首都です。", "猫が好きです。", "naïve café 🙂"]
    tok = BPETokenizer.train(texts * 5, vocab_size=300)
    for t in ["The cat sat.", "東京の猫が好きです。", "café 🙂 zebra-unseen"]:
        ids = tok.encode(t)
        assert ids[0] == 2 and ids[-1] == 3 and 1 not in ids
        assert tok.decode(ids) == t
    again = tokenizer_from_json(tok.to_json())
    assert again.encode("猫です") == tok.encode("猫です")


def test_bad_tokenizer_inputs():
    with pytest.raises(ValueError, match="no words"):
        WordTokenizer.train(["   ", ""], 100)
    with pytest.raises(ValueError, match="not a newllm_nb tokenizer"):
        tokenizer_from_json('{"kind": "char"}')
    with pytest.raises(ValueError, match="not a newllm_nb tokenizer"):
        tokenizer_from_json("garbage")
