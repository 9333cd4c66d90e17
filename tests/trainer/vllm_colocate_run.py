"""Runs TIPGKDTrainer with colocated vLLM rollouts in a fresh process and reports what the test checks, as JSON.

vLLM initializes torch.distributed and sets RANK/WORLD_SIZE in its host process, so it runs apart from the suite.
Usage: python vllm_colocate_run.py <student> <teacher> <output.json> <max_steps> <learning_rate>
"""

import json
import sys

import torch


def main(student, teacher, out_path, max_steps, learning_rate):
    from transformers import AutoTokenizer

    from trl_tip import TIPConfig, TIPGKDTrainer
    from trl_tip.testing import tiny_math_dataset

    tokenizer = AutoTokenizer.from_pretrained(student)
    args = TIPConfig(
        output_dir=out_path + ".run",
        max_steps=max_steps,
        per_device_train_batch_size=4,
        max_completion_length=16,
        learning_rate=learning_rate,
        report_to="none",
        bf16=False,
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        use_vllm=True,
        vllm_mode="colocate",
        vllm_enforce_eager=True,
        vllm_gpu_memory_utilization=0.3,
        vllm_max_model_length=512,
        token_selector="soft_or",
        seed=0,
    )
    trainer = TIPGKDTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=tiny_math_dataset(16),
        processing_class=tokenizer,
    )
    engine = trainer.vllm_generation.llm.llm_engine.model_executor.driver_worker.model_runner.model
    engine_params = dict(engine.named_parameters())
    name = "model.layers.0.self_attn.o_proj.weight"
    initial = engine_params[name].detach().clone()
    trainer.train()
    # The engine receives the weights before each generation, so after the last step it holds the previous step's
    # student; push the final ones as the next rollout would.
    trainer.vllm_generation.sync_weights()
    student_weight = dict(trainer.model.named_parameters())[name].detach().to(initial.dtype)
    from vllm import SamplingParams

    messages = [[{"role": "user", "content": "What is 2 plus 3?"}]]
    greedy = trainer.vllm_generation.llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)
    batch = trainer._buffered_inputs[0]
    texts = tokenizer.batch_decode(batch["completion_ids"], skip_special_tokens=True)
    result = {
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "engine_changed": not torch.equal(engine_params[name], initial),
        "engine_matches_student": torch.equal(engine_params[name].detach(), student_weight),
        "engine_dtype": str(initial.dtype),
        "completions": texts,
        "greedy_answer": greedy[0].outputs[0].text,
        "selected_fraction": [h.get("tip/selected_fraction") for h in trainer.state.log_history if "loss" in h],
    }
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]))
