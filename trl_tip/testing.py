"""Tiny, fully local models and tokenizers for tests and offline smoke runs (no Hub access)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CORPUS = [
    "What is 12 plus 7? The answer is 19.",
    "Tom has 3 apples and buys 5 more. How many apples does he have now? He has 8 apples.",
    "A train travels 60 miles in 2 hours. What is its speed? 30 miles per hour.",
    "Compute 144 divided by 12, then add 9. The result is 21.",
    "user assistant system You are a helpful assistant. Think step by step.",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 + - * / = ? . , ! ( ) :",
]


def tiny_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in memory on a few sentences, with a ChatML chat template."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token=None,
        padding_side="left",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_causal_lm(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    tie_word_embeddings: bool = False,
    vocab_size: int | None = None,
) -> Qwen3ForCausalLM:
    """A randomly initialized Qwen3 model over `tokenizer`'s vocabulary; head_dim 64 so vLLM's CPU attention runs
    it. `vocab_size` (embedding and head rows, default `len(tokenizer)`) may pad the vocabulary past the tokenizer, as
    real checkpoints do (Qwen2.5-1.5B: 151936 rows, Qwen2.5-14B: 152064, for 151665 tokens)."""
    config = Qwen3Config(
        vocab_size=len(tokenizer) if vocab_size is None else vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=max(1, hidden_size // 64),
        num_key_value_heads=max(1, hidden_size // 64),
        head_dim=64,
        max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def tiny_math_dataset(n: int = 16, with_completions: bool = False, seed: int = 0, with_answers: bool = False):
    """Conversational prompts (and optional reference completions and integer `answer`s) of one-step additions, as a
    `datasets.Dataset`."""
    import random

    from datasets import Dataset

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        row = {"prompt": [{"role": "user", "content": f"What is {a} plus {b}?"}]}
        if with_completions:
            row["completion"] = [{"role": "assistant", "content": f"The answer is {a + b}."}]
        if with_answers:
            row["answer"] = a + b
        rows.append(row)
    return Dataset.from_list(rows)


def save_tiny_pair(
    output_dir: str,
    num_prompts: int = 16,
    student_vocab_size: int | None = None,
    teacher_vocab_size: int | None = None,
) -> None:
    """
    Writes a tiny random student (hidden size 64) and teacher (128), each with the tiny tokenizer, to
    `<output_dir>/student` and `<output_dir>/teacher`, and `num_prompts` prompts (with their `solution`) to
    `<output_dir>/prompts.jsonl`: what `trl-tip tiny-models` writes. The vocab sizes (default: the tokenizer's
    length) pad the heads past the tokenizer, e.g. by different amounts, like Qwen2.5-1.5B's and Qwen2.5-14B's heads.
    """
    import os

    tokenizer = tiny_tokenizer()
    for name, model in (
        ("student", tiny_causal_lm(tokenizer, hidden_size=64, seed=0, vocab_size=student_vocab_size)),
        ("teacher", tiny_causal_lm(tokenizer, hidden_size=128, seed=1, vocab_size=teacher_vocab_size)),
    ):
        path = os.path.join(output_dir, name)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    # With each problem's answer in `solution`, as `trl-lib/DeepMath-103K` keeps it (a self teacher can read it).
    prompts = tiny_math_dataset(num_prompts, with_answers=True)
    prompts = prompts.map(lambda row: {"solution": str(row["answer"])}, remove_columns=["answer"])
    prompts.to_json(os.path.join(output_dir, "prompts.jsonl"))
