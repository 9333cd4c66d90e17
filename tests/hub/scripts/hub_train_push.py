"""Trains tiny models with `push_to_hub=True` against the Hub at HF_ENDPOINT and pushes at the end, as a user's script
would; runs in its own process because huggingface_hub reads HF_ENDPOINT when it is imported.
Usage: python hub_train_push.py <output_dir> <hub_model_id> [<revision>]
"""

import sys


def main(output_dir, hub_model_id, revision=None):
    from trl_tip import TIPConfig, TIPGKDTrainer
    from trl_tip.testing import tiny_causal_lm, tiny_math_dataset, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    args = TIPConfig(
        output_dir=output_dir,
        max_steps=2,
        per_device_train_batch_size=2,
        max_completion_length=8,
        learning_rate=1e-2,
        report_to="none",
        bf16=False,
        use_cpu=True,
        save_strategy="no",
        seed=7,
        token_selector="soft_or",
        selection_ratio=0.5,
        push_to_hub=True,
        hub_model_id=hub_model_id,
        hub_private_repo=True,
    )
    trainer = TIPGKDTrainer(
        model=tiny_causal_lm(tokenizer, seed=0),
        teacher_model=tiny_causal_lm(tokenizer, hidden_size=128, seed=1),
        args=args,
        train_dataset=tiny_math_dataset(8),
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.push_to_hub(dataset_name="tiny-sums", revision=revision)
    print("PUSHED", trainer.hub_model_id, trainer.tip_stats_dataset_id)


if __name__ == "__main__":
    main(*sys.argv[1:])
