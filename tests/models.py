"""Tiny transformers models built from configs (random init, fixed seeds, no downloads) and PEFT wrappers.

Other test files import these builders: keep the names and signatures stable.

    tiny_llama(tied=False)   separate q/k/v/o and gate/up/down projections (nn.Linear, layout "linear")
    tiny_gpt2()    fused c_attn as transformers Conv1D (weight stored (in, out): layout "fan_in_fan_out")
    tiny_neox()    fused query_key_value nn.Linear
    tiny_mixtral(), tiny_qwen2_moe(), tiny_gpt_oss()   MoE models; transformers 5 holds their experts fused,
                   `mlp.experts.gate_up_proj` / `down_proj` 3-D parameters ((E, out, in); gpt-oss (E, in, out))
    peft_model(model, **lora_config_kwargs)   a PeftModel whose lora_B are random (non-zero) with a fixed seed
    base_state_dict(model)   the model's state dict as contiguous float32 clones (what a base file holds)
    sample_input()           a fixed batch of token ids
"""

from __future__ import annotations

import torch

VOCAB = 64


def _seeded(seed: int):
    torch.manual_seed(seed)


def tiny_llama(seed: int = 0, hidden: int = 16, layers: int = 2, tied: bool = False):
    """A 2-layer Llama with hidden 16, 4 heads (2 key/value heads), intermediate 32, vocab 64, in float32;
    `tied`: lm_head is the embedding's tensor (tie_word_embeddings, as Llama 3.2 1B and Gemma)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _seeded(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0, hidden: int = 16, layers: int = 2):
    """A 2-layer GPT-2 with n_embd 16, 4 heads, vocab 64: c_attn/c_proj/c_fc are Conv1D (fan_in_fan_out)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    _seeded(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=4, n_positions=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_neox(seed: int = 0, hidden: int = 16, layers: int = 2):
    """A 2-layer GPT-NeoX with hidden 16, 4 heads, vocab 64: fused query_key_value nn.Linear."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    _seeded(seed)
    cfg = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                        num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=64,
                        tie_word_embeddings=False)
    return GPTNeoXForCausalLM(cfg).eval()


def tiny_mixtral(seed: int = 0, hidden: int = 16, experts: int = 3):
    """A 1-layer Mixtral, hidden 16, intermediate 24, `experts` experts (top 2), vocab 64."""
    from transformers import MixtralConfig, MixtralForCausalLM

    _seeded(seed)
    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=24, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=experts, num_experts_per_tok=2,
                        max_position_embeddings=64)
    return MixtralForCausalLM(cfg).eval()


def tiny_qwen2_moe(seed: int = 0, hidden: int = 16, experts: int = 4):
    """A 1-layer Qwen2-MoE, hidden 16, expert intermediate 8, a shared expert of 16, `experts` experts (top 2)."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    _seeded(seed)
    cfg = Qwen2MoeConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=32, moe_intermediate_size=8,
                         shared_expert_intermediate_size=16, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, num_experts=experts, num_experts_per_tok=2, max_position_embeddings=64)
    return Qwen2MoeForCausalLM(cfg).eval()


def tiny_gpt_oss(seed: int = 0, hidden: int = 16, experts: int = 3):
    """A 1-layer gpt-oss, hidden 16, intermediate 12: experts stored (E, in, out), gate/up interleaved."""
    from transformers import GptOssConfig, GptOssForCausalLM

    _seeded(seed)
    cfg = GptOssConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=12, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=4, num_local_experts=experts,
                       num_experts_per_tok=2, max_position_embeddings=64, layer_types=["full_attention"],
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return GptOssForCausalLM(cfg).eval()


def peft_model(model, seed: int = 1, **lora_config_kwargs):
    """Wrap `model` in a PeftModel with LoraConfig(**lora_config_kwargs) and random non-zero lora_B.

    PEFT initialises lora_B to zero (ΔW = 0); every lora parameter (A, B, embedding A/B, lora bias) is
    redrawn here from a seeded generator so that deltas are non-trivial and reproducible.
    `target_modules` defaults to "all-linear"; `r`, `lora_alpha` default to 4 and 8.
    """
    from peft import LoraConfig, get_peft_model

    kw = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "lora_dropout": 0.0}
    kw.update(lora_config_kwargs)
    pm = get_peft_model(model, LoraConfig(**kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(pm.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return pm.eval()


def base_state_dict(model) -> dict:
    """The model's own state dict (keys as transformers names them), cloned, contiguous."""
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def sample_input(batch: int = 2, length: int = 8, seed: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)


__all__ = ["tiny_llama", "tiny_gpt2", "tiny_neox", "peft_model", "base_state_dict", "sample_input", "VOCAB"]
