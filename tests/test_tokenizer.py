import json

import pytest

from crsm_core.tokenizer import (ByteTokenizer, HFTokenizer, IncrementalDecoder, TokenIdTokenizer, TokenizerError,
                                 load_tokenizer)

SAMPLES = ["hello, world", "naïve café", "日本語のテキスト", "emoji 👩‍🚀🚀 and 🇯🇵", "mixed: 中文 ✓ ok"]


@pytest.mark.parametrize("text", SAMPLES)
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text


@pytest.mark.parametrize("text", SAMPLES)
def test_streaming_decode_never_splits_a_character(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    decoder = IncrementalDecoder(tok)
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.flush())
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    # each piece is whole characters: re-encoding it gives a contiguous run of the original bytes
    offset = 0
    encoded = text.encode()
    for p in pieces:
        b = p.encode()
        assert encoded[offset:offset + len(b)] == b
        offset += len(b)


def test_streaming_decode_split_at_every_byte_boundary():
    # Feed the text in two parts cut at every byte: the output never differs.
    text = "a😀b中c"
    tok = ByteTokenizer()
    ids = tok.encode(text)
    for cut in range(len(ids) + 1):
        decoder = IncrementalDecoder(tok)
        first = "".join(decoder.push(i) for i in ids[:cut])
        second = "".join(decoder.push(i) for i in ids[cut:]) + decoder.flush()
        assert first + second == text
        assert "\ufffd" not in first


def test_invalid_bytes_are_not_held_forever():
    tok = ByteTokenizer()
    decoder = IncrementalDecoder(tok)
    out = "".join(decoder.push(i) for i in [0xFF, 0xFE, 0xFF, 0xFE, 0x41])
    assert "A" in out + decoder.flush()


def test_special_tokens_are_not_text():
    tok = ByteTokenizer()
    assert tok.decode([104, 105, tok.eos_id]) == "hi"
    assert tok.vocab_size == 260


def _write_hf_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    vocab = {"<|endoftext|>": 0, "h": 1, "i": 2, "Ġ": 3, "hi": 4}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("h", "i")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(path / "tokenizer.json"))


def test_hf_tokenizer_loads_from_directory(tmp_path):
    _write_hf_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer)
    assert tok.encode("hi") == [4]
    assert tok.decode([4, 0]) == "hi"
    assert tok.eos_id == 0
    out = tmp_path / "saved"
    out.mkdir()
    tok.save(out)
    assert load_tokenizer(out).encode("hi") == [4]


def test_default_is_byte_and_errors_name_the_file(tmp_path):
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"type": "hf"}))
    with pytest.raises(TokenizerError, match="tokenizer.json is missing"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("garbage")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


def test_a_token_id_tokenizer_is_saved_and_loaded_with_its_vocabulary(tmp_path):
    TokenIdTokenizer(50277).save(tmp_path)
    loaded = load_tokenizer(tmp_path, vocab_size=50277)
    assert isinstance(loaded, TokenIdTokenizer) and loaded.vocab_size == 50277 and loaded.eos_id == 0
    assert loaded.decode([5, 0, 17]) == " t5 t17"   # eos is not text
    with pytest.raises(TokenizerError, match="token-id prompts only"):
        loaded.encode("hello")
    with pytest.raises(TokenizerError, match="vocab_size 50277 is not the model's"):
        load_tokenizer(tmp_path, vocab_size=1000)
