import pytest

from argonne_dt.tokenizer import QWEN25_VOCAB_SIZE, TokenizerError, load_tokenizer


def test_offline_qwen25_vocabulary():
    tok = load_tokenizer("qwen2.5")
    assert len(tok) == QWEN25_VOCAB_SIZE == 151_665
    assert tok("Hello, world!", add_special_tokens=False)["input_ids"] == [9707, 11, 1879, 0]
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [151643, 151644, 151645]
    assert tok.convert_tokens_to_ids("<|file_sep|>") == 151664
    # Qwen3's additions are gone: "<think>" is ordinary text again.
    assert all(i < QWEN25_VOCAB_SIZE for i in tok("<think></think>")["input_ids"])
    assert tok.decode([9707, 11, 1879, 0]) == "Hello, world!"


def test_local_directory_round_trip(tmp_path):
    load_tokenizer("qwen2.5").save_pretrained(tmp_path)
    again = load_tokenizer(str(tmp_path))
    assert len(again) == 151_665 and again("Hello, world!")["input_ids"] == [9707, 11, 1879, 0]


def test_unresolvable_spec_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match=r"data.tokenizer='no-such/tokenizer-xyz': cannot load this hub name"):
        load_tokenizer("no-such/tokenizer-xyz")
    with pytest.raises(TokenizerError, match="cannot load this directory offline"):
        load_tokenizer(str(tmp_path))
