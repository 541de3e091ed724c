"""Run by test_trainer.py, test_envs.py and test_async.py in a subprocess: train the RL fixture (checkpoints every 2
steps) and SIGKILL it between rollout batches, in the middle of generating one (in any of a step's sampling rounds, or
an episode's turns), in an environment's step, or between two updates of one step. With --resume it continues the
run in --out first. Each trained step's prompt indices are appended to trained.jsonl; an async run writes its
generation process's pid to generation.pid."""

import argparse
import os
import signal
from pathlib import Path

import torch

from paperloop.callbacks import Callback

from tests.support.callbacks import KillAt, TrainedPrompts
from tests.support.rl import RESUME_RUNS, Retry, SGDRLTrainer, make_rl_trainer


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--run", required=True, choices=sorted(RESUME_RUNS))
    p.add_argument("--resume", action="store_true", help="fit(resume='latest')")
    p.add_argument("--kill-at-step", type=int, help="SIGKILL in on_batch_begin when global_step == this")
    p.add_argument("--kill-in-generate", type=int, help="SIGKILL at the first decoding forward (after the "
                   "prefill) of the step that starts at this global_step")
    p.add_argument("--kill-in-round", type=int, default=1, help="with --kill-in-generate: in this sampling round "
                   "of the step (dynamic sampling draws several)")
    p.add_argument("--kill-after-update", type=int, help="SIGKILL right after the Nth optimizer update")
    p.add_argument("--kill-in-env-step", type=int, help="SIGKILL in an environment's step (run env) of the step "
                   "that starts at this global_step ...")
    p.add_argument("--kill-at-turn", type=int, default=1, help="... on the first episode's this-th turn")
    args = p.parse_args()
    torch.set_num_threads(1)

    class Killing(SGDRLTrainer):
        def optimizer_step(self):
            outputs = super().optimizer_step()
            if self.state.updates == args.kill_after_update:
                os.kill(os.getpid(), signal.SIGKILL)
            return outputs

    class GenerationPid(Callback):  # where the test finds the generation process (async runs) after the kill
        def on_batch_begin(self, trainer, step):
            if trainer.generation is not None:
                Path(args.out, "generation.pid").write_text(str(trainer.generation.process.pid))

    callbacks = [GenerationPid(), TrainedPrompts(Path(args.out, "trained.jsonl"))]
    callbacks += [] if args.kill_at_step is None else [KillAt(args.kill_at_step)]
    trainer = make_rl_trainer(args.out, callbacks=callbacks, cls=Killing, **RESUME_RUNS[args.run])
    prefills = []

    def kill_in_generation(module, inputs, kwargs):
        if torch.is_inference_mode_enabled() and trainer.state.global_step == args.kill_in_generate:
            if kwargs["input_ids"].shape[1] > 1:  # a round's prefill (prompts are longer than one token)
                prefills.append(1)
            elif len(prefills) == args.kill_in_round:  # the first token's forward after that prefill
                os.kill(os.getpid(), signal.SIGKILL)

    trainer.unwrapped_model.register_forward_pre_hook(kill_in_generation, with_kwargs=True)
    step = Retry.step

    def killing_step(env, action):
        if trainer.state.global_step == args.kill_in_env_step and len(env.record["actions"]) + 1 == args.kill_at_turn:
            os.kill(os.getpid(), signal.SIGKILL)
        return step(env, action)

    Retry.step = killing_step
    trainer.fit(resume="latest" if args.resume else None)


if __name__ == "__main__":
    main()
