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
    else:
        raise KeyError(name)
    return model.eval()


def example_inputs(batch: int = 2, seq: int = SEQ, seed: int = 0):
    """The (args, kwargs) pair torch.export takes: HF models want input_ids by keyword."""
    gen = torch.Generator().manual_seed(seed)
    return (), {"input_ids": torch.randint(0, VOCAB, (batch, seq), generator=gen)}


NAMES = ("gpt2", "llama", "bert")
