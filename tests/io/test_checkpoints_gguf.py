"""read_gguf on the embedded SmolLM2: tensors, logits, greedy text and tokens match transformers."""

from __future__ import annotations

import gguf
import jax
import numpy as np
import pytest
import torch
import transformers

from jtrust.io.gguf import read_gguf
from jtrust.models.model import forward_jit
from jtrust.models.config import config_from_hf
from jtrust.io.convert import hf_to_params

PROMPTS = ["The capital of France is", "Trust, but verify: large language models",
           "1, 2, 3, 4, 5,"]
TEXTS = ["Hello world", " leading space", "   three spaces", "Numbers: 12345, 3.14159 and 1,000,000",
         "naïve café — résumé", "日本語のテキスト 一个", "emoji 🤖🎉 ok", "tabs\tand\nnewlines\n\n",
         "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n", "don't won't it's I'LL",
         "<|endoftext|>def f(x):\n    return x ** 2", "", "x²+y³"]


@pytest.fixture(scope="module")
def raw(smollm2_gguf):
    return read_gguf(smollm2_gguf)


@pytest.fixture(scope="module")
def model(raw):
    config = config_from_hf(raw.hf_config)
    return config, jax.device_put(hf_to_params(raw.tensors, config))  # once, not on every call


@pytest.fixture(scope="module")
def hf_model(smollm2_gguf):
    return transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_gguf):
    return transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


def test_config(raw):
    c = config_from_hf(raw.hf_config)
    assert (c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff, c.vocab_size) == (
        30, 576, 9, 3, 64, 1536, 49152)
    assert (c.norm_eps, c.rope_theta, c.max_positions, c.tie_embeddings) == (1e-5, 1e5, 8192, True)
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (1, 2, 2)


def test_tensors_match_transformers(raw, hf_model):
    expected = hf_model.state_dict()
    assert set(raw.tensors) == set(expected) - {"lm_head.weight"}  # tied: no output.weight
    worst = 0.0
    for name, w in raw.tensors.items():
        assert w.dtype == np.float32 and w.shape == tuple(expected[name].shape), name
        worst = max(worst, float(np.abs(w - expected[name].numpy()).max()))
    assert worst <= 1e-6


def test_logits_match_transformers(raw, model, hf_model):
    config, params = model
    tok = raw.tokenizer
    tokens, mask = tok.pad_batch(PROMPTS)
    got = np.asarray(forward_jit(params, tokens, mask, config=config).logits)
    for b, prompt in enumerate(PROMPTS):
        ids = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            want = hf_model(ids).logits[0].numpy()
        np.testing.assert_allclose(got[b, : ids.shape[1]], want, atol=1e-3, rtol=0, err_msg=prompt)


def test_greedy_chat_matches_transformers(raw, model, hf_model):
    config, params = model
    tok = raw.tokenizer
    prompt = tok.encode(tok.chat("What is the capital of France?"))
    new = 12
    with torch.no_grad():
        want = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                                 max_new_tokens=new, do_sample=False)[0, len(prompt):].tolist()
    # a fixed-length buffer keeps one compiled shape; no cache, the whole prefix each step
    tokens = np.zeros((1, len(prompt) + new), np.int32)
    tokens[0, : len(prompt)] = prompt
    got = []
    for n in range(len(prompt), len(prompt) + new):
        mask = (np.arange(tokens.shape[1]) < n)[None].astype(np.int32)
        logits = forward_jit(params, tokens, mask, config=config).logits
        next_id = int(np.argmax(logits[0, n - 1]))
        tokens[0, n] = next_id
        got.append(next_id)
        if next_id in tok.stop_ids:
            break
    assert got == want
    assert "The capital of France is Paris." in tok.decode(got)


QUESTIONS = ["What is the capital of France?", "Name a primary colour.",
             "How many legs does a spider have?", "Who wrote Romeo and Juliet?"]


def test_engine_greedy_chat_matches_transformers(raw, model, hf_model):
    """jtrust.runtime.generate (batched, left-padded, KV cache) vs transformers, one prompt at a time."""
    import jtrust
    config, params = model
    engine = jtrust.Model(config, params, raw.tokenizer, "smollm2", "test")
    new = 16
    got = jtrust.generate(engine, QUESTIONS, max_new_tokens=new, chat=True)
    for b, question in enumerate(QUESTIONS):
        prompt = raw.tokenizer.encode(raw.tokenizer.chat(question))
        with torch.no_grad():
            want = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                                     max_new_tokens=new, do_sample=False)[0, len(prompt):].tolist()
        assert got.tokens[b, 0, : got.lengths[b, 0]].tolist() == want, question
    assert got.texts[0][0].startswith("The capital of France is Paris.")


def test_tokenizer_matches_transformers(raw, hf_tokenizer):
    tok = raw.tokenizer
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos, tok.stop_ids) == (1, 2, 2, False, (2,))
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf_tokenizer.encode(text, add_special_tokens=False), text
        for skip in (True, False):
            assert tok.decode(ids, skip) == hf_tokenizer.decode(ids, skip_special_tokens=skip), text
    assert tok.encode("<|im_end|>") == [2]  # control tokens stay whole
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert tok.chat(messages[0]["content"]) == hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)


def test_digits_split_like_llama_cpp(raw):
    """The file's pre-tokenizer is "smollm": llama.cpp cuts every digit off first, then applies
    the GPT-2 split. transformers' GGUF loader skips the first step, which only shows when
    whitespace precedes a digit (it gives "a", "Ġ", "Ġ", "1", "2", "3" here)."""
    tok = raw.tokenizer
    pieces = lambda text: [tok.backend.id_to_token(i) for i in tok.encode(text)]
    assert pieces("a  123") == ["a", "ĠĠ", "1", "2", "3"]
    assert pieces(" ½") == ["Ġ", "Â½"]


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such GGUF file") as err:
        read_gguf(tmp_path / "absent.gguf")
    assert str(tmp_path / "absent.gguf") in str(err.value)


def test_not_gguf(tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("these are not weights\n")
    with pytest.raises(ValueError, match="not a GGUF file") as err:
        read_gguf(path)
    assert str(path) in str(err.value)


def test_truncated(smollm2_gguf, tmp_path):
    path = tmp_path / "truncated.gguf"
    with open(smollm2_gguf, "rb") as f:
        path.write_bytes(f.read(1 << 20))
    with pytest.raises(ValueError, match="truncated or corrupt") as err:
        read_gguf(path)
    assert str(path) in str(err.value)


def test_other_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(path, "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported") as err:
        read_gguf(path)
    assert str(path) in str(err.value)
