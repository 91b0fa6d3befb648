"""Test helpers shared by every test module: tiny random Hugging Face checkpoints built locally
(with their torch models as oracles), a tiny tokenizer, random tokens."""

from __future__ import annotations

import functools
import pathlib

import numpy as np

TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4)

CORPUS = ["The quick brown fox jumps over the lazy dog.", "Trust, but verify.",
          "Large language models encode concepts linearly.", "What is the capital of France?"] * 4


def tiny_hf_config(family: str):
    import transformers
    if family == "llama":
        return transformers.LlamaConfig(**TINY, num_key_value_heads=2, rms_norm_eps=1e-5,
                                        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    if family == "llama_tied":
        return transformers.LlamaConfig(**TINY, num_key_value_heads=2, rms_norm_eps=1e-5,
                                        rope_theta=100000.0, tie_word_embeddings=True,
                                        bos_token_id=1, eos_token_id=2)
    if family == "qwen2":
        return transformers.Qwen2Config(**TINY, num_key_value_heads=2, tie_word_embeddings=False,
                                        bos_token_id=1, eos_token_id=2)
    if family == "mistral":
        return transformers.MistralConfig(**TINY, num_key_value_heads=1, sliding_window=None,
                                          bos_token_id=1, eos_token_id=2)
    if family == "gpt_neox":
        return transformers.GPTNeoXConfig(**TINY, rotary_pct=0.25, bos_token_id=1, eos_token_id=2)
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=300, n_embd=64, n_layer=3, n_head=4,
                                       n_positions=128, bos_token_id=1, eos_token_id=2)
    raise KeyError(family)


FAMILIES = ("llama", "llama_tied", "qwen2", "mistral", "gpt_neox", "gpt2")


@functools.lru_cache(maxsize=None)
def tiny_tokenizer_json() -> str:
    """A byte-level BPE tokenizer with 300 ids trained on a few sentences (no hub)."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok.to_str()


def make_tiny_hf_dir(path: pathlib.Path, family: str, seed: int = 0, noise: float = 0.05):
    """Write a tiny random `family` checkpoint (safetensors + config + tokenizer) to `path`.

    Returns the torch model (eval mode) for oracle comparisons.
    """
    import torch
    import transformers
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_hf_config(family)).eval()
    with torch.no_grad():  # default inits are near-degenerate (zero biases, unit norms)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * noise)
    model.save_pretrained(path)
    (path / "tokenizer.json").write_text(tiny_tokenizer_json())
    return model


def random_tokens(shape, vocab=300, seed=0):
    return np.random.RandomState(seed).randint(3, vocab, shape).astype(np.int32)


def random_llama(config, tokenizer=None, name: str = "tiny", seed: int = 0):
    """A jtrust Model with normal random weights in init_params' layout, built in place (no
    checkpoint files; init_params' Linen init would compile for seconds)."""
    import jax
    from jtrust.models.decoder import init_params
    from jtrust.models.model import Model
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        key = path[-1].key
        if key == "scale":
            return np.ones(leaf.shape, np.float32)
        std = 1.0 if key == "embedding" else leaf.shape[-2] ** -0.5
        return (std * rng.normal(size=leaf.shape)).astype(np.float32)

    shapes = jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))
    return Model(config, jax.tree_util.tree_map_with_path(draw, shapes), tokenizer, name=name,
                 checkpoint_hash=f"{name}-{seed}")


def assert_grads_match_torch(grads, torch_model, config, rtol: float = 2e-5) -> None:
    """jtrust gradients [params pytree] against the .grad of a backpropagated transformers
    model, each leaf within rtol of that leaf's largest magnitude; clears the torch grads."""
    import jax
    from jtrust.io.convert import hf_to_params
    want = hf_to_params({k: v.grad.numpy() for k, v in torch_model.named_parameters()}, config)
    torch_model.zero_grad()
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, atol=rtol * np.abs(b).max()),
                 grads, want)
