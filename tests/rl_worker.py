"""Run by test_rl_trainer.py in a subprocess: train the RL fixture (checkpoints every 2 steps) and SIGKILL it
between rollout batches, in the middle of generating one, or between two updates of one step."""

import argparse
import os
import signal

import torch

from helpers import KillAt
from rl_helpers import RESUME_RUNS, SGDRLTrainer, make_rl_trainer


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--run", required=True, choices=sorted(RESUME_RUNS))
    p.add_argument("--kill-at-step", type=int, help="SIGKILL in on_batch_begin when global_step == this")
    p.add_argument("--kill-in-generate", type=int, help="SIGKILL at the first decoding forward (after the "
                   "prefill) of the step that starts at this global_step")
    p.add_argument("--kill-after-update", type=int, help="SIGKILL right after the Nth optimizer update")
    args = p.parse_args()
    torch.set_num_threads(1)

    class Killing(SGDRLTrainer):
        def optimizer_step(self):
            outputs = super().optimizer_step()
            if self.state.updates == args.kill_after_update:
                os.kill(os.getpid(), signal.SIGKILL)
            return outputs

    callbacks = [] if args.kill_at_step is None else [KillAt(args.kill_at_step)]
    trainer = make_rl_trainer(args.out, callbacks=callbacks, cls=Killing, **RESUME_RUNS[args.run])
    sampling_forwards = []

    def kill_in_generation(module, inputs):
        if torch.is_inference_mode_enabled() and trainer.state.global_step == args.kill_in_generate:
            sampling_forwards.append(1)
            if len(sampling_forwards) == 2:  # the prefill, then the first token's forward
                os.kill(os.getpid(), signal.SIGKILL)

    trainer.unwrapped_model.register_forward_pre_hook(kill_in_generation)
    trainer.fit()


if __name__ == "__main__":
    main()
