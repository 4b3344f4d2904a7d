"""Tiny, deterministic model factories shared by the tests.

Every factory seeds the global RNG itself, so each rank of a multi-process test builds identical weights.
All models are fp32 and left in training mode; dropout probabilities are 0 so training mode is
deterministic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

__all__ = [
    "TinyTransformer",
    "bert",
    "gpt2",
    "llama",
    "mlp",
    "mlp_inputs",
    "tiny_transformer",
    "token_inputs",
]

MLP_IN = 32
MLP_HIDDEN = 64
TINY_VOCAB = 64
HF_VOCAB = 128


# ----------------------------------------------------------------------------------------------- MLP


class MLP(nn.Module):
    """Linear(32->64) -> GELU -> Linear(64->32), both with bias."""

    def __init__(self, dim: int = MLP_IN, hidden: int = MLP_HIDDEN) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP()


def mlp_inputs(batch: int = 4, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, MLP_IN, generator=g)


# ----------------------------------------------------------------------------------- TinyTransformer


class Block(nn.Module):
    """Pre-norm transformer block: causal multi-head self-attention and a 4x GELU MLP."""

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.ln1 = nn.LayerNorm(dim)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, D = x.shape
        h = self.ln1(x)
        q = self.q_proj(h).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        a = a.transpose(1, 2).reshape(B, S, D)
        x = x + self.o_proj(a)
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class TinyTransformer(nn.Module):
    """Hand-written decoder-only LM: embedding, pre-norm blocks, final LayerNorm, untied LM head."""

    def __init__(self, vocab: int = TINY_VOCAB, dim: int = 32, n_heads: int = 4, n_layers: int = 2) -> None:
        super().__init__()
        self.vocab = vocab
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def tiny_transformer(seed: int = 0) -> TinyTransformer:
    torch.manual_seed(seed)
    return TinyTransformer()


# ------------------------------------------------------------------------------------- transformers


def llama(num_kv_heads: int = 2, layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=HF_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=128,
        attention_dropout=0.0,
        use_cache=False,
    )
    return LlamaForCausalLM(config).float()


def gpt2(layers: int = 2, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=HF_VOCAB,
        n_positions=128,
        n_embd=64,
        n_layer=layers,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        summary_first_dropout=0.0,
        bos_token_id=HF_VOCAB - 1,
        eos_token_id=HF_VOCAB - 1,
        use_cache=False,
    )
    # The sdpa attention of GPT-2 does not export (Conv1D view of a transposed tensor); eager does.
    config._attn_implementation = "eager"
    return GPT2LMHeadModel(config).float()


def bert(layers: int = 2, seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=HF_VOCAB,
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=128,
    )
    return BertModel(config).float()


def token_inputs(vocab: int, batch: int = 2, seq: int = 8, seed: int = 1) -> torch.Tensor:
    """Random ``input_ids`` of shape ``(batch, seq)`` from a private generator (global RNG untouched)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)
