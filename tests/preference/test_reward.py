"""RewardTrainer: its updates against a naive loop of the Bradley-Terry loss, invariance to how a step is split,
checkpoints that load as sequence classifiers, and a trained reward model as RLTrainer's scorer, one forward per
rollout batch."""

import torch
import torch.nn.functional as F

from paperloop.callbacks import LambdaCallback
from paperloop.checkpoint import committed
from paperloop.plans import epoch_permutation
from paperloop.preference import RewardModelScorer
from paperloop.preference.reward import sequence_rewards

from tests.support.preference import make_pairs, make_reward_model, make_rm
from tests.support.rl import make_rl_trainer, make_tokenizer


def whole_ids(tok, prompt: str, completion: str) -> list[int]:
    return tok(prompt)["input_ids"] + tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def naive_reward_model(cfg, steps: int):
    """The loss of each step by the formula, one unpadded float64 forward per side, the reward the score head's
    value at the side's last token (its EOS); SGD."""
    tok, data = make_tokenizer(), make_pairs()
    model = make_reward_model().double()
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    order = torch.cat([epoch_permutation(len(data), cfg.seed, e) for e in range(2)])
    B = cfg.batch_size * cfg.grad_accum_steps
    for s in range(steps):
        pairs = [data[i] for i in order[s * B:(s + 1) * B].tolist()]
        rewards = {k: torch.stack([model(torch.tensor([whole_ids(tok, p["prompt"], p[k])])).logits[0, 0]
                                   for p in pairs]) for k in ("chosen", "rejected")}
        loss = -F.logsigmoid(rewards["chosen"] - rewards["rejected"]).mean() \
            + cfg.center_rewards_coefficient * ((rewards["chosen"] + rewards["rejected"]) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def test_updates_match_a_naive_loop_and_do_not_depend_on_the_split(tmp_path):
    runs = [make_rm(tmp_path / f"run{k}", model=make_reward_model().double(), max_steps=3,
                    center_rewards_coefficient=0.05, batch_size=4 // k, grad_accum_steps=k) for k in (1, 4)]
    for run in runs:
        run.fit()
    expected = naive_reward_model(runs[0].config, steps=3)
    moved = 0.0
    initial = make_reward_model().double().state_dict()
    for name, value in expected.state_dict().items():
        for run in runs:
            torch.testing.assert_close(run.unwrapped_model.state_dict()[name], value, rtol=0, atol=1e-10)
        moved = max(moved, (value - initial[name]).abs().max().item())
    assert moved > 1e-3


def test_the_reward_is_read_at_each_sides_last_token_even_when_padding_is_eos(tmp_path):
    """A transformers sequence classifier pools at the last token that is not its pad id: with pad = EOS (a
    tokenizer without a pad token) that is the token before each side's EOS, not the EOS the model trained on."""
    tok = make_tokenizer()
    model = make_reward_model(pad_token_id=tok.eos_token_id).eval()
    rows = [whole_ids(tok, "1+2=", "3"), whole_ids(tok, "10+2=", "12")]
    width = max(map(len, rows))
    ids = torch.tensor([row + [tok.eos_token_id] * (width - len(row)) for row in rows])
    attention = (torch.arange(width) < torch.tensor([len(r) for r in rows])[:, None]).long()
    with torch.no_grad():
        ours = sequence_rewards(model, ids, attention, torch.tensor([len(r) - 1 for r in rows]))
        alone = [model(torch.tensor([row])).logits for row in rows]  # one row, no padding: the score at its end?
        scores = model.model(torch.tensor([rows[0]])).last_hidden_state
    assert torch.allclose(ours[0], model.score(scores)[0, -1, 0].float(), atol=1e-6)
    assert not torch.allclose(ours[0], alone[0][0, 0].float(), atol=1e-6)  # HF pooled before the EOS


def test_checkpoints_load_as_sequence_classifiers_and_score_the_same(tmp_path):
    from transformers import AutoModelForSequenceClassification

    trainer = make_rm(tmp_path, max_steps=2, checkpoint_every_steps=2)
    trainer.fit()
    loaded = AutoModelForSequenceClassification.from_pretrained(committed(tmp_path / "checkpoints")[0]).eval()
    batch = trainer.collate(trainer.train_data[:4])
    with torch.no_grad():
        assert torch.equal(sequence_rewards(loaded, batch["input_ids"], batch["attention_mask"], batch["last"]),
                           sequence_rewards(trainer.unwrapped_model.eval(), batch["input_ids"],
                                            batch["attention_mask"], batch["last"]))


def test_a_reward_model_scores_each_rollout_batch_in_one_forward_as_rls_reward(tmp_path):
    reward_model = make_reward_model(seed=3).eval()
    forwards = []
    reward_model.register_forward_hook(lambda module, args, out: forwards.append(1))
    scorer = RewardModelScorer(reward_model, make_tokenizer())
    outputs, seen = [], []
    trainer = make_rl_trainer(tmp_path, max_steps=2, reward_fns=[scorer], log_completions=16,
                              callbacks=[LambdaCallback(on_batch_end=lambda t, o: outputs.append(o))])
    play = trainer.play
    trainer.play = lambda *args, **kwargs: seen.append(play(*args, **kwargs)) or seen[-1]
    trainer.fit()
    assert len(forwards) == 2  # one per step: 16 completions in one forward each
    records = outputs[0]["records/rollouts"]
    direct = scorer([r["prompt"] for r in records], [r["completion"] for r in records], [{}] * 16)
    assert [r["rewards"]["reward_model"] for r in records] == direct  # the batched values, per completion
    assert seen[0].rewards_N_F[:, 0].tolist() == direct
