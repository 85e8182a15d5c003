"""Both tokenizers read text as NFC at training and at encoding, and record it in their JSON (their hash);
a tokenizer that records no normalisation (an older checkpoint's) keeps its behaviour."""

import json
import unicodedata

import pytest

from newllm_nb.data.tokenizer import (
    BPETokenizer,
    WordTokenizer,
    tokenizer_from_hub_json,
    tokenizer_from_json,
    tokenizer_hash,
)

NFC = "le café est ouvert, la crème brûlée aussi"
NFD = unicodedata.normalize("NFD", NFC)  # what macOS pastes
TEXTS = [NFC, "un café noir et une crème", "the café at the corner", "x² and ﬁve full-width ＡＢＣ"]


@pytest.mark.parametrize("cls", [WordTokenizer, BPETokenizer])
def test_text_typed_in_nfd_reads_as_the_nfc_text_it_was_trained_on(cls):
    assert NFD != NFC
    tok = cls.train(TEXTS, 300)
    assert tok.encode(NFD) == tok.encode(NFC)
    assert tok.encode_batch([NFD]) == [tok.encode(NFC)]
    ids, lengths = tok.encode_flat([NFD, NFC])
    assert list(lengths) == [len(tok.encode(NFC))] * 2 and list(ids[:lengths[0]]) == tok.encode(NFC)
    if cls is WordTokenizer:
        assert 1 not in tok.encode(NFD)  # no <unk>: "café" is a known word however it was typed
    # NFC, not NFKC: compatibility characters stay what they are
    assert tok.decode(tok.encode("x²")).replace(" ", "") == "x²"


@pytest.mark.parametrize("cls", [WordTokenizer, BPETokenizer])
def test_the_normalisation_is_recorded_and_travels_with_the_tokenizer(cls):
    tok = cls.train(TEXTS, 300)
    assert json.loads(tok.to_json())["normalization"] == "NFC"
    for back in (tokenizer_from_json(tok.to_json()), tokenizer_from_hub_json(tok.to_hub_json())):
        assert back.normalization == "NFC" and back.encode(NFD) == tok.encode(NFC)
        assert tokenizer_hash(back) == tokenizer_hash(tok)
    plain = cls.train(TEXTS, 300, normalization=None)
    assert "normalization" not in json.loads(plain.to_json())
    assert tokenizer_hash(plain) != tokenizer_hash(tok)  # the fingerprint says which one a run used


@pytest.mark.parametrize("cls", [WordTokenizer, BPETokenizer])
def test_a_tokenizer_recording_no_normalisation_keeps_its_behaviour(cls):
    old = tokenizer_from_json(cls.train(TEXTS, 300, normalization=None).to_json())  # an older checkpoint's
    assert old.normalization is None
    assert old.encode(NFD) != old.encode(NFC)  # as before: NFD text is other text to it
