"""KV-cache decoding gives the tokens of full recomputation and of transformers' greedy generate."""

import numpy as np
import pytest

import jaxtune
from jaxtune.model.decode import generate, sample

torch = pytest.importorskip("torch")
import tiny_hf  # noqa: E402


@pytest.mark.parametrize("case", ["llama", "mistral-window", "qwen3"])
def test_greedy_generation_matches_transformers(case, tmp_path):
    torch_model = tiny_hf.save_model(case, tmp_path)
    model = jaxtune.load_pretrained(str(tmp_path))
    prompt = np.array([5, 17, 3, 44, 9, 12, 60])
    ours = list(generate(model.params, model.config, prompt, max_new_tokens=12))
    with torch.no_grad():
        theirs = torch_model.generate(torch.as_tensor(prompt[None]), max_new_tokens=12, do_sample=False,
                                      min_new_tokens=12, pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == theirs
    # and the cache path equals recomputing the whole prefix at every step; the prefix is padded on
    # the right to the final length, which causal attention keeps out of its logits, so one
    # compiled forward serves all 12 steps (a new length each step compiles 12 times, ~9 s)
    ids = list(prompt)
    length = len(prompt) + 12
    for _ in range(12):
        padded = np.array([ids + [0] * (length - len(ids))])
        ids.append(int(np.argmax(np.asarray(model(padded))[0, len(ids) - 1])))
    assert ours == ids[len(prompt):]


def test_generation_stops_at_eos(tmp_path):
    tiny_hf.save_model("llama", tmp_path)
    model = jaxtune.load_pretrained(str(tmp_path))
    prompt = np.array([1, 2, 3])
    free = list(generate(model.params, model.config, prompt, max_new_tokens=6))
    stopped = list(generate(model.params, model.config, prompt, max_new_tokens=6, eos_ids=(free[2],)))
    assert stopped == free[:free.index(free[2]) + 1]


def test_top_p_keeps_only_the_nucleus():
    import jax
    import jax.numpy as jnp

    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    draws = {int(sample(logits, jax.random.key(i), 1.0, 0.7)[0]) for i in range(200)}
    assert draws == {0, 1}
