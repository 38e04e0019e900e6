"""Small Hugging Face models built from configs (no weights are downloaded), shared by tests."""
import torch

VOCAB, SEQ = 256, 16


def build(name: str, seed: int = 0, layers: int = 2) -> torch.nn.Module:
    from transformers import (BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM)
    torch.manual_seed(seed)
    if name == "gpt2":
        cfg = GPT2Config(n_layer=layers, n_head=4, n_embd=64, vocab_size=VOCAB, n_positions=64, use_cache=False,
                         bos_token_id=0, eos_token_id=0)
        model = GPT2LMHeadModel(cfg)
    elif name == "llama":
        cfg = LlamaConfig(num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                          intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=64, use_cache=False,
                          bos_token_id=0, eos_token_id=0, pad_token_id=0)
        model = LlamaForCausalLM(cfg)
    elif name == "bert":
        cfg = BertConfig(num_hidden_layers=layers, num_attention_heads=4, hidden_size=64, intermediate_size=128,
                         vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0)
        model = BertModel(cfg)
    elif name in SERVE_NAMES:
        model = _build_causal_lm(name, layers)
    else:
        raise KeyError(name)
    return model.eval()


def _build_causal_lm(name: str, layers: int) -> torch.nn.Module:
    """The causal LMs ort-paged serving is checked on: 2 layers, width 64, vocabulary 256,
    64 positions, 4 heads (2 kv heads where the architecture has GQA)."""
    import transformers as tf
    common = dict(num_hidden_layers=layers, num_attention_heads=4, hidden_size=64, vocab_size=VOCAB,
                  max_position_embeddings=64, use_cache=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    decoder = dict(common, num_key_value_heads=2, intermediate_size=128)
    if name in ("llama-untied", "llama-tied"):
        return tf.LlamaForCausalLM(tf.LlamaConfig(**decoder, tie_word_embeddings=name == "llama-tied"))
    if name == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(**decoder, head_dim=16))
    if name == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**decoder))
    if name == "gpt-neox":
        return tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**common, intermediate_size=128))
    if name == "opt":
        return tf.OPTForCausalLM(tf.OPTConfig(**common, ffn_dim=128, word_embed_proj_dim=64))
    if name == "gpt2-lm":
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=layers, n_head=4, n_embd=64, vocab_size=VOCAB,
                                                n_positions=64, use_cache=False, bos_token_id=1,
                                                eos_token_id=2, pad_token_id=0))
    raise KeyError(name)


def example_inputs(batch: int = 2, seq: int = SEQ, seed: int = 0):
    """The (args, kwargs) pair torch.export takes: HF models want input_ids by keyword."""
    gen = torch.Generator().manual_seed(seed)
    return (), {"input_ids": torch.randint(0, VOCAB, (batch, seq), generator=gen)}


NAMES = ("gpt2", "llama", "bert")
# causal LMs served by ort-paged (tests/backends/test_ort_hf.py)
SERVE_NAMES = ("gpt2-lm", "llama-untied", "llama-tied", "mistral", "qwen2", "gpt-neox", "opt")
