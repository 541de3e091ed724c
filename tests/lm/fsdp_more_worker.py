"""Run under torchrun (2 CPU processes, gloo) by test_fsdp_more.py, FSDP2 (strategy="fsdp"):

    --what resume   a 1-process checkpoint (--checkpoint) of SFT on a model with tied embeddings continued on 2
                    processes, validated every epoch on data that gives the two processes unequal batch counts; rank 0
                    writes the final weights and the validations; each rank writes the RNG state it resumed with
    --what sample   greedy generation where rank 0's rows stop at their first token and rank 1's run on to
                    max_new_tokens; each rank writes its completions

The processes leave with os._exit, as tests/fsdp_worker.py explains (a gloo FSDP process sometimes aborts in
interpreter teardown after all its work is done)."""

import argparse
import hashlib
import json
import os
import random
import sys
from pathlib import Path


import numpy as np
import torch
from safetensors.torch import save_file

from paperloop import SFTConfig, SFTTrainer
from paperloop.callbacks import LambdaCallback
from paperloop.models import tiny_causal_lm
from tests.support.lm import VOCAB, sorting_examples, tokenizer

RUN = dict(max_length=24, max_epochs=2, lr=3e-3, seed=3)
GLOBAL_BATCH = 8
VAL = 9  # 2 processes of batch 4: 5 and 4 examples, so 2 batches and 1


def tied_model():
    return tiny_causal_lm(len(VOCAB) + 8, hidden_size=32, num_layers=2, num_heads=2, tie_word_embeddings=True).double()


def trainer(out, processes: int, callbacks=(), **cfg) -> SFTTrainer:
    """The same global batch whatever the process count."""
    settings = {**RUN, "batch_size": GLOBAL_BATCH // processes, "output_dir": str(out), **cfg}
    return SFTTrainer(tied_model(), SFTConfig(**settings), tokenizer=tokenizer(), train_data=sorting_examples(40),
                      val_data=sorting_examples(VAL, seed=1), callbacks=list(callbacks))


def rng_digest() -> dict:
    """What a process's global random streams are at this moment."""
    return {"torch": hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest(),
            "numpy": np.random.get_state()[1][:4].tolist(), "python": list(random.getstate()[1][:4])}


def resume(out: Path, checkpoint: str) -> None:
    record = LambdaCallback(on_train_begin=lambda t: (out / f"rng-rank{t.rank}.json").write_text(
        json.dumps(rng_digest())))
    t = trainer(out / "resumed", 2, callbacks=[record], strategy="fsdp")
    t.fit(resume=checkpoint)
    state = t.state_dict()["model"]  # gathered whole to rank 0 (a collective)
    if t.is_main_process:
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / "resumed.safetensors"))
        (out / "resumed.json").write_text(json.dumps({"val_history": t.state.val_history,
                                                      "global_step": t.state.global_step}))


def sample(out: Path) -> None:
    rank = torch.distributed.get_rank()
    vocab = len(VOCAB) + 8
    stop = list(range(vocab)) if rank == 0 else [vocab - 1]  # rank 0: any token ends a row
    t = SFTTrainer(tied_model(), SFTConfig(**RUN, batch_size=4, output_dir=str(out / "sample"), strategy="fsdp"),
                   tokenizer=tokenizer(), train_data=sorting_examples(8), stop_token_ids=stop)
    prompts = [tokenizer()("sort 3 1 2 =")["input_ids"], tokenizer()("sort 9 =")["input_ids"]]
    samples = t.generate(prompts, max_new_tokens=10)
    (out / f"sample-rank{rank}.json").write_text(json.dumps(samples.completions()))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--checkpoint", required=True)
    args = p.parse_args()
    out = Path(args.out)
    torch.set_num_threads(1)
    resume(out, args.checkpoint)
    sample(out)
    leave()


def leave() -> None:
    """Out at once when every process is done (see the module's docstring)."""
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
