"""Run by test_adapters.py in a subprocess: train a tiny model on skyrl-gym's multi-turn gsm8k (checkpoints every 2
steps) and SIGKILL it in an environment's step, on the first episode's second turn of the step that starts at
--kill-at-step. Also the fixture the test builds its straight and resumed runs from: the model starts from a short
SFT on answers in gsm8k's format ("#### 17", often wrong), so that the environment's rewards differ within a group
(an untrained model never writes "####": every reward 0, no gradient, nothing for a resume to get wrong).

    python -m tests.rl.adapters_worker --model /tmp/warm --out /tmp/run --kill-at-step 3
"""

import argparse
import os
import random
import signal

import torch

from transformers import AutoModelForCausalLM

from paperloop import RLConfig, RLTrainer, SFTConfig, SFTTrainer
from paperloop.models.lm import bpe_tokenizer, tiny_causal_lm
from paperloop.rl import SkyRLGymEnv

GSM8K = "gsm8k_multi_turn"
# SkyRL's gsm8k rows ask for the answer after "####" (its data preparation appends this to each question)
INSTRUCTION = " Let's think step by step and output the final answer after \"####\"."
MAX_TURNS = 3


def gsm8k_rows(n: int, seed: int = 0) -> list[dict]:
    """Grade-school word problems made here (no dataset is downloaded), in SkyRL's row format: the chat prompt, the
    reward spec with the ground truth, and the episode's turn limit."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b, c = rng.randrange(2, 20), rng.randrange(2, 20), rng.randrange(1, 5)
        question = f"Sam has {a} pens and buys {b} more, then gives away {c}. How many pens does Sam have?"
        rows.append({"prompt": [{"role": "user", "content": question + INSTRUCTION}], "env_class": GSM8K,
                     "reward_spec": {"method": "rule", "ground_truth": str(a + b - c)},
                     "extra_info": {"max_turns": MAX_TURNS}})
    return rows


def observation_texts() -> list[str]:
    """What the environment says between turns, asked of skyrl-gym itself (so the tokenizer knows its characters)."""
    env = SkyRLGymEnv.factory(GSM8K)(gsm8k_rows(1)[0])
    env.reset(0)
    texts = []
    for _ in range(MAX_TURNS - 1):
        texts += [m["content"] for m in env.step("no answer").observation]
    return texts


def make_tokenizer():
    """Byte-level BPE trained on the prompts, the environment's messages and answers: it writes spaces, which the
    strict format "#### 17" needs (a per-character tokenizer drops them)."""
    texts = [m["content"] for row in gsm8k_rows(64) for m in row["prompt"]] + observation_texts()
    return bpe_tokenizer(texts + [f"#### {n}" for n in range(-5, 45)], vocab_size=320)


def warm_model(folder) -> None:
    """A tiny model taught by SFT to answer in gsm8k's format, right about a third of the time; saved to `folder`."""
    rng = random.Random(1)
    chats = []
    for row in gsm8k_rows(64, seed=1):
        answer = int(row["reward_spec"]["ground_truth"]) + rng.choice([0, 1, -1])
        chats.append({"messages": [*row["prompt"], {"role": "assistant", "content": f"#### {answer}"}]})
    tok = make_tokenizer()
    model = tiny_causal_lm(len(tok), hidden_size=32, num_layers=2, num_heads=2, seed=0)
    sft = SFTTrainer(model, SFTConfig(batch_size=8, lr=1e-2, max_steps=20, max_length=96, seed=0,
                                      output_dir=str(folder)), tokenizer=tok, train_data=chats)
    sft.fit()
    sft.unwrapped_model.save_pretrained(folder)


def make_trainer(model_folder, out, callbacks=(), **overrides) -> RLTrainer:
    cfg = dict(batch_size=2, num_generations=4, max_new_tokens=6, max_turns=MAX_TURNS, lr=1e-3, max_steps=6,
               seed=0, output_dir=str(out), checkpoint_every_steps=2, inner_epochs=2, minibatch_size=1)
    cfg.update(overrides)
    model = AutoModelForCausalLM.from_pretrained(model_folder)
    return RLTrainer(model, RLConfig(**cfg), tokenizer=make_tokenizer(), train_data=gsm8k_rows(12),
                     env=SkyRLGymEnv.factory(GSM8K), callbacks=list(callbacks))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True, help="the folder warm_model wrote")
    p.add_argument("--out", required=True)
    p.add_argument("--kill-at-step", type=int, required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    trainer = make_trainer(args.model, args.out)
    step, turns = SkyRLGymEnv.step, []

    def killing_step(env, action):
        if trainer.state.global_step == args.kill_at_step:
            turns.append(action)
            if len(turns) == 2:  # the first episode's second turn (episodes step turn by turn, together)
                os.kill(os.getpid(), signal.SIGKILL)
        return step(env, action)

    SkyRLGymEnv.step = killing_step
    trainer.fit()


if __name__ == "__main__":
    main()
