"""A chat episode's observations under templates that normalize whitespace (Llama 3's `| trim`) or render only the
roles they know: continued token for token, or refused by name — never a tool result the policy cannot see."""

import pytest

from paperloop.models import bpe_tokenizer
from paperloop.rl.envs import Env, _observation_ids

TRIM = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] | trim }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
KNOWN_ROLES = ("{% for m in messages %}{% if m['role'] in ['user', 'assistant'] %}<|{{ m['role'] }}|>{{ m['content'] }}"
               "<|end|>{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def tokenizer(template):
    tok = bpe_tokenizer(["what is 12 + 7 ?", "the answer is 19", "call add ( 12 , 7 )", "result : 19"], 200,
                        min_frequency=1)
    tok.chat_template = template
    return tok


def observe(tok, action, observation):
    chat = [{"role": "user", "content": "what is 12 + 7 ?"}]
    before = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    ids = _observation_ids(observation, chat, action, None, tok, False, Env(), "example 0", 1)
    return before, ids


@pytest.mark.parametrize("action", ["the answer is 19 ", "  the answer is 19", "the answer is 19\n\n"])
def test_a_template_that_trims_the_assistants_content_is_continued_after_the_tokens_sampled(action):
    """The Llama-3 style `| trim` stopped the run the first time an action ended in whitespace."""
    tok = tokenizer(TRIM)
    before, ids = observe(tok, action, [{"role": "user", "content": "again"}])
    rendered = tok.apply_chat_template([{"role": "user", "content": "what is 12 + 7 ?"},
                                        {"role": "assistant", "content": action}, {"role": "user", "content": "again"}],
                                       tokenize=False, add_generation_prompt=True)
    # the environment's tokens are the template's text after the (trimmed) content: its end marker onwards
    assert tok.decode(ids) == rendered[len(before) + len(action.strip()):] == "<|end|><|user|>again<|end|><|assistant|>"


def test_an_observation_the_template_does_not_render_is_refused_naming_its_role():
    tok = tokenizer(KNOWN_ROLES)
    before, ids = observe(tok, "call add ( 12 , 7 )", [{"role": "user", "content": "result : 19"}])
    assert "result : 19" in tok.decode(ids)
    with pytest.raises(ValueError, match=r"does not render the observation's 'tool' message .* result_role='user'"):
        observe(tok, "call add ( 12 , 7 )", [{"role": "tool", "content": "result : 19"}])
