"""A model handed over in eval mode (as `from_pretrained` returns it) trains in train mode: dropout is on in an SFT
step, and gradient checkpointing recomputes each decoder layer in the backward; validation switches to eval and
puts each module's own mode back (a part the user froze in eval mode stays in eval mode)."""

import torch

from tests.support.engine import Regression, make_data, make_model
from paperloop import SFTConfig, SFTTrainer, TrainerConfig
from paperloop.callbacks import LambdaCallback
from paperloop.models import tiny_causal_lm
from tests.support.lm import VOCAB, sorting_examples, tokenizer

RUN = dict(max_length=24, batch_size=8, max_steps=1, lr=3e-3)


def first_loss(tmp_path, name, model, **cfg) -> float:
    losses = []
    t = SFTTrainer(model, SFTConfig(**RUN, output_dir=str(tmp_path / name), **cfg), tokenizer=tokenizer(),
                   train_data=sorting_examples(16), callbacks=[LambdaCallback(
                       on_batch_end=lambda t, o: losses.append(float(o["train/loss"])))])
    t.fit()
    return losses[0]


def dropout_lm(p: float):
    return tiny_causal_lm(len(VOCAB) + 8, hidden_size=32, num_layers=2, num_heads=2, attention_dropout=p)


def test_a_model_given_in_eval_mode_trains_with_dropout_on(tmp_path):
    given_in_eval = first_loss(tmp_path, "eval", dropout_lm(0.5).eval())
    given_in_train = first_loss(tmp_path, "train", dropout_lm(0.5).train())
    without_dropout = first_loss(tmp_path, "off", dropout_lm(0.0).train())
    assert given_in_eval == given_in_train  # the same dropout masks: the same seed, both in train mode
    assert given_in_eval != without_dropout  # and dropout did act (in eval mode it would equal this)


def count_layer_forwards(model) -> list[int]:
    """Forwards of each decoder layer's MLP run with grad enabled (a training forward, or its recomputation in the
    backward: checkpointing runs the layer's forward again there, inside the layer's hooks, so it is counted here)."""
    counts = [0] * len(model.model.layers)
    for i, layer in enumerate(model.model.layers):
        forward = layer.mlp.forward

        def counted(*args, i=i, forward=forward, **kwargs):
            counts[i] += torch.is_grad_enabled()
            return forward(*args, **kwargs)
        layer.mlp.forward = counted
    return counts


def test_gradient_checkpointing_recomputes_every_layer_even_for_a_model_left_in_eval_mode(tmp_path):
    """LoRA leaves the embeddings frozen: reentrant checkpointing would give the layers no gradient (the loss would
    not require grad), and a model in eval mode would not recompute at all."""
    from tests.support.lm import model

    lm = model()
    counts = count_layer_forwards(lm)
    per_step = []
    t = SFTTrainer(lm, SFTConfig(**{**RUN, "max_steps": 2}, output_dir=str(tmp_path), gradient_checkpointing=True,
                                 lora={"r": 4}), tokenizer=tokenizer(), train_data=sorting_examples(16),
                   callbacks=[LambdaCallback(on_batch_end=lambda t, o: per_step.append(list(counts)))])
    t.model.eval()  # e.g. the user looked at the model's outputs before training
    adapters = {k: v.clone() for k, v in t.unwrapped_model.state_dict().items() if "lora_B" in k}
    t.fit()
    assert per_step == [[2, 2], [4, 4]]  # one micro-batch a step: a forward and its recomputation, in every layer
    trained = t.unwrapped_model.state_dict()
    assert all(not torch.equal(trained[k], v) for k, v in adapters.items())  # every layer's adapters got a gradient


def test_validation_puts_back_each_modules_own_mode(tmp_path):
    modes = []
    model = make_model()
    model[2].eval()  # the user froze the dropout layer in eval mode on purpose
    t = Regression(model, TrainerConfig(max_epochs=2, batch_size=8, output_dir=str(tmp_path)), train_data=make_data(16),
                   val_data=make_data(8), callbacks=[LambdaCallback(
                       on_batch_begin=lambda t, s: modes.append([m.training for m in t.model]))])
    t.fit()
    assert t.state.val_history  # a validation ran between the epochs
    assert modes == [[True, True, False, True]] * 4  # before and after it: the user's choice kept
