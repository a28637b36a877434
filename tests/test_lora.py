"""LoRA as a parameter transform: the linear math, targets, init, trainable split, dropout, merge."""

import math

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from jaxtune import lora
from jaxtune.errors import ConfigError
from jaxtune.lora_fused_product import pays_off
from jaxtune.model.config import ModelConfig
from jaxtune.model.linear import dense, linear
from jaxtune.model.params import init_params, param_specs
from jaxtune.model.transformer import forward
from jaxtune.mesh import make_mesh
from jaxtune.sharding import activation_sharding, merged_rules, tree_shardings
from jaxtune.train.state import combine

# Distinct sizes so no two kinds of tensor share a shape (the no-merged-weight test relies on it).
CFG = ModelConfig(family="llama", vocab_size=61, hidden_size=24, intermediate_size=40, num_layers=3,
                  num_heads=4, num_kv_heads=2, head_dim=6,
                  initializer_range=0.2)  # large enough weights that a few steps visibly lower the loss
PROJ = {n: (*p, n, "kernel") for n, p in [("q_proj", ("layers", "self_attn")), ("k_proj", ("layers", "self_attn")),
                                            ("v_proj", ("layers", "self_attn")), ("o_proj", ("layers", "self_attn")),
                                            ("gate_proj", ("layers", "mlp")), ("up_proj", ("layers", "mlp")),
                                            ("down_proj", ("layers", "mlp"))]}
SPECS = {"q_proj": "btd,dnh->btnh", "o_proj": "btnh,nhd->btd", "gate_proj": "btd,df->btf", "down_proj": "btf,fd->btd"}


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0))


def run(params, batch):
    """float32 logits of the test model (jitted: eager scans are slow)."""
    return _forward(params, batch)


_forward = jax.jit(lambda params, batch: forward(params, CFG, batch))


def ids(rows=2, length=7, seed=0):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, size=(rows, length))


def randomize_adapters(params, seed=1, magnitude_jitter=0.1):
    """Non-zero B (and perturbed DoRA magnitudes) so adapters change the output."""
    flat = traverse_util.flatten_dict(params)
    for i, (path, leaf) in enumerate(lora.lora_leaves(params).items()):
        key = jax.random.key(seed * 1000 + i)
        leaf = leaf.replace(b=0.3 * jax.random.normal(key, leaf.b.shape))
        if leaf.magnitude is not None:
            leaf = leaf.replace(magnitude=leaf.magnitude * (1 + magnitude_jitter * jax.random.normal(key, leaf.magnitude.shape)))
        flat[path] = leaf
    return traverse_util.unflatten_dict(flat)


def layer_slice(leaf, i):
    return jax.tree.map(lambda x: x[i], leaf)


# --- the linear math -------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("dora", [False, True])
def test_linear_equals_dense_with_merged_weight(params, name, dora):
    cfg = lora.LoraConfig(r=3, alpha=7.0, target_modules=(name,), use_dora=dora)
    leaf = randomize_adapters(lora.apply(params, cfg, CFG, jax.random.key(1)))
    leaf = traverse_util.flatten_dict(leaf)[PROJ[name]]
    w0 = layer_slice(leaf, 1)
    x = jax.random.normal(jax.random.key(2), (2, 5, *w0.a.shape[:-1]))
    ours = linear(x, w0, SPECS[name], jnp.float32)
    in_ndim = w0.a.ndim - 1
    merged = w0.base + w0.scale * (w0.a.reshape(-1, 3) @ w0.b.reshape(3, -1)).reshape(w0.base.shape)
    if dora:  # PEFT: m / ||W + s·BA|| per output feature, times (W + s·BA)
        norm = jnp.sqrt(jnp.sum(merged ** 2, axis=tuple(range(in_ndim))))
        merged = merged * (w0.magnitude / norm)
    np.testing.assert_allclose(ours, dense(x, merged, SPECS[name], jnp.float32), rtol=1e-5, atol=1e-6)
    # merge() computes the same kernel for export
    np.testing.assert_allclose(lora.merge({"w": leaf})["w"][1], merged, rtol=1e-6, atol=1e-7)


def _eqn_shapes(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn.primitive.name, [tuple(v.aval.shape) for v in eqn.outvars]
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _eqn_shapes(sub)


@pytest.mark.parametrize("name", ["q_proj", "o_proj", "down_proj"])
def test_forward_and_backward_never_form_a_full_weight(params, name):
    # Forming W + s·BA (or its gradient) would show up as a dot/add/mul producing a kernel-shaped
    # array; LoRA's point is that only x@A and (x@A)@B products exist.
    cfg = lora.LoraConfig(r=3, alpha=6.0, target_modules=(name,))
    leaf = layer_slice(traverse_util.flatten_dict(lora.apply(params, cfg, CFG, jax.random.key(0)))[PROJ[name]], 0)
    x = jnp.ones((2, 5, *leaf.a.shape[:-1]))

    def loss(ab, base):
        return jnp.sum(linear(x, leaf.replace(a=ab[0], b=ab[1], base=base), SPECS[name], jnp.float32) ** 2)

    jaxpr = jax.make_jaxpr(jax.grad(loss))((leaf.a, leaf.b), leaf.base).jaxpr
    kernel = tuple(leaf.base.shape)
    formed = [(prim, s) for prim, shapes in _eqn_shapes(jaxpr) for s in shapes
              if s == kernel and prim in ("dot_general", "add", "add_any", "mul", "transpose")]
    assert not formed, f"a kernel-shaped {kernel} array is computed: {formed}"


WIDE_CFG = ModelConfig(family="llama", vocab_size=61, hidden_size=8, intermediate_size=20, num_layers=2,
                       num_heads=2, num_kv_heads=1, head_dim=4)


def test_widening_projections_take_one_matmul_over_x_and_xa():
    """gate/up (outputs ≥ 2× inputs, tokens ≥ 4× inputs) compute x@W + xa@sB as [x | xa] @ [W ; sB]
    (lora_fused_product.py): the same values and gradients as the two products, with two matmuls
    fewer (dy read once for dx and dxa; no separate adapter product) and none for the frozen W."""
    params = randomize_adapters(lora.apply(init_params(WIDE_CFG, jax.random.key(0)), lora.LoraConfig(
        r=3, alpha=6.0, target_modules=("gate_proj",)), WIDE_CFG, jax.random.key(1)))
    leaf = layer_slice(traverse_util.flatten_dict(params)[PROJ["gate_proj"]], 0)
    x = jax.random.normal(jax.random.key(2), (2, 16, 8))
    assert pays_off("btd,df->btf", x.shape, leaf.base.shape)
    assert not pays_off("btd,df->btf", (2, 15, 8), leaf.base.shape)  # 30 tokens < 4 × 8 inputs
    assert not pays_off("btd,dnh->btnh", x.shape, (8, 2, 4)) and not pays_off("btf,fd->btd", (2, 99, 20), (20, 8))

    def two_products(x, a, b):
        return x @ leaf.base + (x @ a) @ (leaf.scale * b)

    def ours(x, a, b):
        return linear(x, leaf.replace(a=a, b=b), "btd,df->btf", jnp.float32)

    def loss(fn):
        return lambda x, a, b: jnp.sum(jnp.sin(fn(x, a, b)))

    np.testing.assert_allclose(ours(x, leaf.a, leaf.b), two_products(x, leaf.a, leaf.b), rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.grad(loss(ours), argnums=(0, 1, 2))(x, leaf.a, leaf.b),
                         jax.grad(loss(two_products), argnums=(0, 1, 2))(x, leaf.a, leaf.b)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Forward: x@A and the one product; backward: [dx | dxa], dsB, dA and dx through A (no
    # gradient for the frozen W). The two products take 8: x@A, xa@sB, x@W; dy@Wᵀ, dxa, dsB, dA, dx.
    def dots(fn):
        return str(jax.make_jaxpr(jax.grad(loss(fn), argnums=(0, 1, 2)))(x, leaf.a, leaf.b)).count("dot_general")

    assert (dots(ours), dots(two_products)) == (6, 8)


def test_fused_lora_product_over_interleaved_parts():
    """With `chunk`, the fused product takes its base as parts interleaved chunk by chunk (the joint
    gate/up form): value and every gradient, the parts' own included when they are differentiated,
    as autodiff of x@interleave(W₁, W₂) + xa@sB; only the parts are kept for the backward."""
    from jaxtune.lora_fused_product import fused_lora_product

    def interleaved(parts, chunk):  # [in, F] each -> [in, F/chunk, n·chunk], chunk by chunk
        return jnp.concatenate([p.reshape(p.shape[0], -1, chunk) for p in parts], axis=-1)

    ks = jax.random.split(jax.random.key(4), 5)
    x, xa = jax.random.normal(ks[0], (2, 8, 16)), jax.random.normal(ks[1], (2, 8, 6))
    w1, w2 = jax.random.normal(ks[2], (16, 32)), jax.random.normal(ks[3], (16, 32))
    sb = jax.random.normal(ks[4], (6, 4, 16))  # [r, F/c, 2c] with c = 8
    spec = "btd,dkc->btkc"

    def ours(x, xa, w1, w2, sb):
        return fused_lora_product(spec, x, xa, (w1, w2), sb, 8)

    def plain(x, xa, w1, w2, sb):
        return jnp.einsum(spec, x, interleaved((w1, w2), 8)) + jnp.einsum("btr,rkc->btkc", xa, sb)

    args = (x, xa, w1, w2, sb)
    np.testing.assert_allclose(ours(*args), plain(*args), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(interleaved((w1, w2), 8)[:, 1, 8:], w2[:, 8:16])  # chunk 1 of the second part
    loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a)))
    for got, want in zip(jax.grad(loss(ours), argnums=tuple(range(5)))(*args),
                         jax.grad(loss(plain), argnums=tuple(range(5)))(*args)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    _, vjp = jax.vjp(lambda xa, sb: ours(x, xa, w1, w2, sb), xa, sb)  # frozen parts
    assert (16, 4, 16) not in {tuple(leaf.shape) for leaf in jax.tree.leaves(vjp)}


def test_fused_lora_product_shards_like_the_two_products():
    """The whole model with gate/up on the fused product, sharded over data, fsdp and tensor (each
    device still has 32 tokens ≥ 4 × 8 inputs), gives the unsharded logits and gradients."""
    cfg = lora.LoraConfig(r=4, alpha=8.0, target_linear=True)
    adapted = randomize_adapters(lora.apply(init_params(WIDE_CFG, jax.random.key(0)), cfg, WIDE_CFG,
                                            jax.random.key(1)))
    with activation_sharding(make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), merged_rules()):
        assert pays_off("btd,df->btf", (8, 16, 8), (8, 20))
    assert_sharded_model_matches_unsharded(adapted, WIDE_CFG)


def assert_sharded_model_matches_unsharded(adapted, cfg, traced_in_backward: str | None = None):
    """The model's loss and gradients on 8 rows × 16 tokens, sharded over data, fsdp and tensor (2
    each), equal the unsharded ones; `traced_in_backward`: a name the sharded backward's jaxpr
    must contain (a kernel's)."""
    batch = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, size=(8, 16)))
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    shardings = tree_shardings(lora.logical_axes(adapted, cfg), adapted, mesh, merged_rules())

    def loss(p):
        return jnp.sum(forward(p, cfg, batch) ** 2)

    with activation_sharding(mesh, merged_rules()):
        if traced_in_backward is not None:
            assert traced_in_backward in str(jax.make_jaxpr(jax.grad(loss))(adapted))
        sharded = jax.jit(jax.value_and_grad(loss))(jax.device_put(adapted, shardings))
    plain = jax.jit(jax.value_and_grad(loss))(adapted)
    np.testing.assert_allclose(sharded[0], plain[0], rtol=1e-5)
    # float32 sums split over devices round differently: ≈ 1e-5 relative at most on these tiny
    # projections (a sharding error is of the order of the values themselves).
    for got, want in zip(jax.tree.leaves(sharded[1]), jax.tree.leaves(plain[1])):
        assert np.linalg.norm(got - want) <= 3e-5 * np.linalg.norm(want)


def test_zero_b_leaves_the_model_unchanged(params):
    cfg = lora.LoraConfig(r=4, alpha=8.0, target_linear=True)
    adapted = lora.apply(params, cfg, CFG, jax.random.key(3))
    np.testing.assert_allclose(run(adapted, ids()), run(params, ids()), rtol=1e-6, atol=1e-6)


def test_merged_params_give_the_adapted_model(params):
    cfg = lora.LoraConfig(r=4, alpha=8.0, target_linear=True, use_dora=True)
    adapted = randomize_adapters(lora.apply(params, cfg, CFG, jax.random.key(3)))
    merged = lora.merge(adapted)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(merged))
    np.testing.assert_allclose(run(merged, ids()), run(adapted, ids()), rtol=1e-5, atol=1e-5)
    assert not np.allclose(run(adapted, ids()), run(params, ids()), atol=1e-3)


# --- initialisation ----------------------------------------------------------------------------

def test_init_follows_peft_defaults(params):
    cfg = lora.LoraConfig(r=8, alpha=16.0, target_modules=("o_proj", "down_proj"), use_dora=True)
    flat = traverse_util.flatten_dict(lora.apply(params, cfg, CFG, jax.random.key(5)))
    for name, fan_in in [("o_proj", CFG.num_heads * CFG.head_dim), ("down_proj", CFG.intermediate_size)]:
        leaf = flat[PROJ[name]]
        bound = 1 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) on [r, fan_in]
        a = np.asarray(leaf.a)
        spec = param_specs(CFG)[PROJ[name]]
        assert a.shape == (CFG.num_layers, *spec.shape[1:1 + spec.in_ndim], 8)
        assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound
        assert abs(a.std() - bound / math.sqrt(3)) < 0.1 * bound  # uniform's std
        assert not np.any(np.asarray(leaf.b))
        assert leaf.scale == 2.0 and leaf.dropout_key is None
        base = np.asarray(leaf.base).reshape(CFG.num_layers, fan_in, -1)
        np.testing.assert_allclose(leaf.magnitude.reshape(CFG.num_layers, -1), np.linalg.norm(base, axis=1), rtol=1e-6)
    # layers and targets get different A
    a = np.asarray(flat[PROJ["o_proj"]].a)
    assert not np.allclose(a[0], a[1])
    assert "q_proj" not in [p[-2] for p in lora.lora_leaves(traverse_util.unflatten_dict(flat))]


def test_rslora_scale():
    assert lora.LoraConfig(r=16, alpha=32, target_linear=True).scale == 2.0
    assert lora.LoraConfig(r=16, alpha=32, target_linear=True, use_rslora=True).scale == 8.0


# --- targets -------------------------------------------------------------------------------------

def _targets(**kw):
    return [p[-2] for p in lora.target_paths(lora.LoraConfig(**kw), CFG)]


def test_target_selection_by_names_regex_and_linear():
    assert _targets(target_modules=("q_proj", "v_proj")) == ["q_proj", "v_proj"]
    assert _targets(target_modules=("self_attn.o_proj", "up_proj")) == ["up_proj", "o_proj"]
    assert _targets(target_modules=r"model\.layers\.\d+\.(self_attn\.[qk]|mlp\.down)_proj") == ["down_proj", "k_proj", "q_proj"]
    assert sorted(_targets(target_linear=True)) == sorted(PROJ)
    # modules_to_save are never LoRA targets (as in PEFT)
    assert "lm_head" not in _targets(target_linear=True, modules_to_save=("lm_head",))


@pytest.mark.parametrize("kw, message", [
    (dict(target_modules=("q_prj",)), "'q_prj' matches no module"),
    (dict(target_modules=r".*attn\.qproj"), "matches no module"),
    (dict(target_modules=r"model\.layers\.[01]\.self_attn\.q_proj"), "matches model.layers.*.self_attn.q_proj in layers [0, 1] only, of 3"),
    (dict(target_modules=("lm_head",)), "LoRA on lm_head is not supported"),
    (dict(target_modules=("input_layernorm",)), "not a linear projection"),
    (dict(target_linear=True, modules_to_save=("embed_tokenz",)), "'embed_tokenz' matches no module"),
])
def test_bad_targets_name_the_problem(kw, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        lora.target_paths(lora.LoraConfig(**kw), CFG)


def test_bad_configs_and_tied_embeddings(params):
    with pytest.raises(ConfigError, match="lora_target_modules or lora_target_linear"):
        lora.LoraConfig(r=4)
    with pytest.raises(ConfigError, match="lora_dropout"):
        lora.LoraConfig(dropout=1.0, target_linear=True)
    with pytest.raises(ConfigError, match="not a valid regex"):
        lora.LoraConfig(target_modules="q_proj(")
    tied = ModelConfig(**{**CFG.__dict__, "tie_word_embeddings": True})
    with pytest.raises(ConfigError, match="tied embeddings"):
        lora.target_paths(lora.LoraConfig(target_linear=True, modules_to_save=("embed_tokens",)), tied)
    adapted = lora.apply(params, lora.LoraConfig(target_modules=("q_proj",)), CFG, jax.random.key(0))
    with pytest.raises(ConfigError, match="already has a LoRA adapter"):
        lora.apply(adapted, lora.LoraConfig(target_modules=("q_proj",)), CFG, jax.random.key(0))


# --- trainable split, optimizer state, training ------------------------------------------------

def loss_fn(params, batch):
    logits = forward(params, CFG, batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


def test_gradients_and_optimizer_state_exist_only_for_adapters(params):
    cfg = lora.LoraConfig(r=4, alpha=8.0, target_modules=("q_proj", "down_proj"), modules_to_save=("lm_head",),
                          use_dora=True)
    adapted = randomize_adapters(lora.apply(params, cfg, CFG, jax.random.key(0)))  # B ≠ 0: A gets gradients
    trainable, frozen = lora.split_trainable(adapted, cfg)
    trainable_shapes = sorted(tuple(x.shape) for x in jax.tree.leaves(trainable))
    expected = []
    for path in (PROJ["q_proj"], PROJ["down_proj"]):
        leaf = traverse_util.flatten_dict(adapted)[path]
        expected += [leaf.a.shape, leaf.b.shape, leaf.magnitude.shape]
    expected.append((CFG.hidden_size, CFG.vocab_size))
    assert trainable_shapes == sorted(expected)
    grads = jax.grad(lambda t: loss_fn(combine(t, frozen), ids(length=9)))(trainable)
    assert jax.tree.structure(grads) == jax.tree.structure(trainable)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    opt_state = optax.adamw(1e-3).init(trainable)
    moment_shapes = sorted(tuple(x.shape) for x in jax.tree.leaves(opt_state) if x.ndim > 0)
    assert moment_shapes == sorted(expected * 2)  # mu and nu, adapter-sized, nothing else
    adapter_numel = sum(math.prod(s) for s in expected)
    assert adapter_numel < 0.25 * CFG.num_params


def train(params, cfg: lora.LoraConfig, steps=12, lr=3e-2, seed=3):
    """`steps` Adam steps of the adapters on one fixed batch; (losses, final params)."""
    trainable, frozen = lora.split_trainable(params, cfg)
    tx = optax.adam(lr)
    opt_state = tx.init(trainable)
    batch = ids(rows=4, length=12, seed=seed)

    @jax.jit
    def step(trainable, opt_state, key):
        def loss(t):
            return loss_fn(lora.with_dropout_keys(combine(t, frozen), key), batch)
        value, grads = jax.value_and_grad(loss)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    losses = []
    for i in range(steps):
        trainable, opt_state, value = step(trainable, opt_state, jax.random.key(i))
        losses.append(float(value))
    return losses, combine(trainable, frozen)


def test_a_few_optax_steps_lower_the_loss_and_touch_only_adapters(params):
    cfg = lora.LoraConfig(r=4, alpha=8.0, dropout=0.1, target_linear=True)
    losses, final = train(lora.apply(params, cfg, CFG, jax.random.key(0)), cfg)
    assert losses[-1] < 0.6 * losses[0], losses
    for path, leaf in lora.lora_leaves(final).items():
        np.testing.assert_array_equal(leaf.base, traverse_util.flatten_dict(params)[path])
        assert np.abs(np.asarray(leaf.b)).max() > 0
    np.testing.assert_array_equal(final["embed_tokens"]["embedding"], params["embed_tokens"]["embedding"])


# --- dropout --------------------------------------------------------------------------------------

def test_dropout_is_on_the_adapter_input_only_and_keyed_per_layer(params):
    cfg = lora.LoraConfig(r=4, alpha=8.0, dropout=0.5, target_linear=True)
    adapted = lora.apply(params, cfg, CFG, jax.random.key(0))
    batch = ids()
    # B = 0: dropout on the adapter path cannot change anything, so the base path is not dropped
    # (float32 rounding only: with dropout q/k/v are projected one by one, without it as one matmul)
    keyed = lora.with_dropout_keys(adapted, jax.random.key(7))
    np.testing.assert_allclose(run(keyed, batch), run(params, batch), rtol=1e-5, atol=1e-5)

    adapted = randomize_adapters(adapted)
    clean = np.asarray(run(adapted, batch))
    keyed_run = jax.jit(lambda k: forward(lora.with_dropout_keys(adapted, k), CFG, batch))
    one, again, other = keyed_run(jax.random.key(7)), keyed_run(jax.random.key(7)), keyed_run(jax.random.key(8))
    np.testing.assert_array_equal(one, again)
    assert not np.allclose(one, clean, atol=1e-3) and not np.allclose(one, other, atol=1e-3)
    # raw key data (as TrainState stores it) works the same
    np.testing.assert_array_equal(keyed_run(jax.random.key_data(jax.random.key(7))), one)

    leaf = traverse_util.flatten_dict(keyed)[PROJ["q_proj"]]
    assert leaf.dropout_key.shape == (CFG.num_layers,)
    masks = [jax.random.bernoulli(k, 0.5, (8,)) for k in leaf.dropout_key]
    assert not np.array_equal(masks[0], masks[1])


def test_dropout_is_inverted_dropout_with_the_right_rate(params):
    # One projection in isolation: the mean over many keys of s·(drop(x)@A)@B is s·(x@A)@B.
    cfg = lora.LoraConfig(r=3, alpha=3.0, dropout=0.3, target_modules=("gate_proj",))
    leaf = traverse_util.flatten_dict(randomize_adapters(lora.apply(params, cfg, CFG, jax.random.key(0))))[PROJ["gate_proj"]]
    w0 = layer_slice(leaf, 0)
    x = jax.random.normal(jax.random.key(1), (1, 4, CFG.hidden_size))
    keys = jax.random.split(jax.random.key(2), 4000)
    outs = jax.vmap(lambda k: linear(x, w0.replace(dropout_key=k), SPECS["gate_proj"], jnp.float32))(keys)
    clean = linear(x, w0, SPECS["gate_proj"], jnp.float32)
    base = dense(x, w0.base, SPECS["gate_proj"], jnp.float32)
    delta = np.asarray(clean - base)
    mean_delta = np.asarray(outs.mean(0) - base)
    assert np.abs(mean_delta - delta).max() < 0.1 * np.abs(delta).max()
    # the fraction of dropped inputs is the rate: each x element is zeroed with probability 0.3
    dropped = jax.vmap(lambda k: lora._dropout(x, k, 0.3))(keys[:200])
    assert abs(float(jnp.mean(dropped == 0)) - 0.3) < 0.01


# --- sharding ----------------------------------------------------------------------------------------

def test_adapters_shard_like_their_base(params):
    cfg = lora.LoraConfig(r=4, alpha=8.0, target_linear=True, use_dora=True)
    adapted = randomize_adapters(lora.apply(params, cfg, CFG, jax.random.key(0)))
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    axes = lora.logical_axes(adapted, CFG)
    shardings = tree_shardings(axes, adapted, mesh, merged_rules())
    q = traverse_util.flatten_dict(shardings)[PROJ["q_proj"]]
    assert q.base.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert q.a.spec == jax.sharding.PartitionSpec(None, "fsdp", None)  # input side like the base
    assert q.b.spec == jax.sharding.PartitionSpec(None, None, "tensor", None)  # output side like the base
    sharded = jax.device_put(adapted, shardings)
    assert traverse_util.flatten_dict(sharded)[PROJ["q_proj"]].a.sharding == q.a
    with activation_sharding(mesh, merged_rules()):
        logits = jax.jit(lambda p: forward(p, CFG, ids(rows=4)))(sharded)
    np.testing.assert_allclose(logits, run(adapted, ids(rows=4)), rtol=1e-5, atol=1e-5)
