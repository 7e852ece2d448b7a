"""Tiny random Hugging Face models built with `transformers` itself, for the import/export tests,
and the moray side of those comparisons (the imported model, inputs its routing does not tie on).

Each config turns on a different part of the mapping: q-LoRA or not, grouped routing, sigmoid
or softmax scores, shared experts, dense first layers, YaRN, half-split rope, tied embeddings.
"""

from __future__ import annotations

from pathlib import Path

import torch

from model.checkpoint import load_config, load_into
from model.generate import SamplingParams, generate
from model.transformer import Transformer
from tests.routing_ties import draw_untied

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 0.707}
MLA = dict(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_attention_heads=4,
           num_key_value_heads=4, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
           max_position_embeddings=64, eos_token_id=None, bos_token_id=None)

CONFIGS: dict[str, tuple[str, dict]] = {
    # DeepSeek-V2-Lite's choices: no q-LoRA, greedy softmax routing, 2 shared experts, a dense first layer, yarn
    "v2-lite-like": ("deepseek_v2", dict(MLA, num_hidden_layers=3, first_k_dense_replace=1, q_lora_rank=None,
                                         n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3,
                                         topk_method="greedy", max_position_embeddings=128, rope_scaling=YARN)),
    # DeepSeek-V2's: q-LoRA, group-limited greedy routing, scaled weights
    "v2-grouped": ("deepseek_v2", dict(MLA, num_hidden_layers=2, first_k_dense_replace=0, q_lora_rank=16,
                                       n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                                       topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                       routed_scaling_factor=1.5)),
    # DeepSeek-V3's: sigmoid + correction bias, groups by top-2 sum, q-LoRA, dense first layer
    "v3-grouped": ("deepseek_v3", dict(MLA, num_hidden_layers=3, first_k_dense_replace=1, q_lora_rank=16,
                                       n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                                       n_group=4, topk_group=2, routed_scaling_factor=2.5)),
    # V3 variant: one group, no renormalization, half-split rope, tied embeddings, yarn, no dense layer
    "v3-plain": ("deepseek_v3", dict(MLA, num_hidden_layers=2, first_k_dense_replace=0, q_lora_rank=None,
                                     n_routed_experts=6, n_shared_experts=2, num_experts_per_tok=3, n_group=1,
                                     topk_group=1, norm_topk_prob=False, rope_interleave=False,
                                     tie_word_embeddings=True, max_position_embeddings=128, rope_scaling=YARN)),
    "mixtral-gqa": ("mixtral", dict(vocab_size=96, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                    num_experts_per_tok=2, max_position_embeddings=64, eos_token_id=None,
                                    bos_token_id=None)),
    "mixtral-mha": ("mixtral", dict(vocab_size=96, hidden_size=32, intermediate_size=20, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=2, head_dim=12, num_local_experts=6,
                                    num_experts_per_tok=3, max_position_embeddings=64, eos_token_id=None,
                                    bos_token_id=None)),
}


def build_hf_model(name: str, seed: int):
    """A random `transformers` model of config `name`, weights drawn large enough that routing
    and attention are far from uniform (the default init makes every expert look alike)."""
    import transformers

    arch, kwargs = CONFIGS[name]
    config_cls, model_cls = {
        "deepseek_v2": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM),
        "deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM),
        "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
    }[arch]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.15)
        for bname, b in model.named_buffers():
            if "e_score_correction_bias" in bname:
                b.normal_(0.0, 0.05)
    model.generation_config.pad_token_id = 0  # quiets generate(); every prompt passes its attention mask
    return model


def save_hf_model(model, out: Path, max_shard_size: str = "40KB") -> Path:
    """save_pretrained in small shards, so the index and several files are exercised."""
    model.save_pretrained(out, max_shard_size=max_shard_size)
    return out


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits.float()


def hf_greedy(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy continuations, one prompt at a time (no padding to get wrong)."""
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=new_tokens, do_sample=False)
            out.append(ids[0, len(prompt):].tolist())
    return out


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


def moray_model(ckpt: Path) -> Transformer:
    """The single-process model of a moray checkpoint (an imported one, here)."""
    model = Transformer(load_config(ckpt), init=False).eval()
    load_into(model, ckpt)
    return model


def untied_inputs(model: Transformer, seed: int, shape: tuple[int, int], cuts: tuple[int, ...] = (),
                  greedy_tokens: int = 0) -> tuple[torch.Tensor, list[list[int]], torch.Tensor, list[list[int]]]:
    """Random tokens and prompts cut from their rows (row i's first cuts[i]) on which moray's
    routing is not near-tied, with moray's logits and greedy continuations. moray's run is the
    one watched: its gate scores equal transformers' to 3e-7 (see tests/routing_ties.py)."""
    gen = torch.Generator().manual_seed(seed)

    def draw() -> tuple[torch.Tensor, list[list[int]]]:
        batch = torch.randint(0, model.cfg.vocab_size, shape, generator=gen)
        return batch, [batch[i, :n].tolist() for i, n in enumerate(cuts)]

    def run(inputs: tuple[torch.Tensor, list[list[int]]]) -> tuple[torch.Tensor, list[list[int]]]:
        with torch.no_grad():
            greedy = generate(model, inputs[1], SamplingParams(max_new_tokens=greedy_tokens)) if cuts else []
            return model(inputs[0]), greedy

    (batch, prompts), (logits, greedy) = draw_untied(model, draw, run)
    return batch, prompts, logits, greedy


def hf_tokenizer(chat_template: str, vocab_size: int = 96):
    """A word-level `transformers` fast tokenizer with special tokens and a chat template."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "hello", "world", "moray", "is",
             "a", "fish", "what", "?", "!"]
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    raw = RawTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="[UNK]",
                                  additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"])
    tok.chat_template = chat_template
    return tok


CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {{ eos_token }} "
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
