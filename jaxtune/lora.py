"""LoRA as a parameter transform: `apply` swaps target kernels for `LoRA` leaves; `linear` does the rest.

A `LoRA` leaf holds the frozen base kernel (a dense array, or an `NF4`/`Int8` leaf for QLoRA) and
the adapter factors, all with the stacked `layers` axis first so `lax.scan` slices them like any
param. `linear(x, w)` on a LoRA leaf computes

    x@W + s·(dropout(x)@A)@B                                   (LoRA, Hu et al. 2021)

and never forms `W + s·AB`: autodiff then only computes gradients for the rank-r factors, which
is what makes LoRA cheaper than a full fine-tune. With DoRA (Liu et al. 2024) it computes what
PEFT 0.21's `DoraLinearVariant.forward` does:

    x@W + (m/‖W + s·AB‖ − 1)·(dropout(x)@W) + (m/‖W + s·AB‖)·s·(dropout(x)@A)@B

with the column norm ‖·‖ (over input features, one per output feature) under `stop_gradient`
(DoRA §4.3; PEFT detaches it), so no gradient flows through the norm to A, B or W. DoRA needs
`W + s·AB` for that norm, so it forms it (one layer at a time, in float32 where PEFT uses the
compute dtype: the same in float32, more precise in bf16) and costs more than plain LoRA.

Everything follows PEFT's defaults, so adapters are interchangeable with PEFT's
(`jaxtune.converters.peft`): A ~ Kaiming-uniform(a=√5) = U(±1/√fan_in), B = 0, scale α/r (α/√r
with rsLoRA), inverted dropout on the adapter's input only, DoRA magnitude initialised to the
weight's column norm. Our kernels are `[*in, *out]` (HF's are `[out, in]`), so here A is
`[L, *in, r]` and B `[L, r, *out]`, PEFT's `lora_A.weight [r, in]` and `lora_B.weight [out, r]`
transposed per layer.

Dropout randomness reaches `linear` inside the leaf: `with_dropout_keys(params, key)` gives every
LoRA leaf a `[L]` array of PRNG keys, one per layer, which the scan slices like the weights; the
train step calls it once per micro-batch on the combined params. Without keys (evaluation,
inference) there is no dropout, as in PEFT's eval mode.

Trainable vs frozen is a pytree mask (`trainable_mask`): the adapter factors (and the DoRA
magnitude) and the params of `modules_to_save` are trainable, everything else is frozen, so the
optimizer holds state only for those.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct, traverse_util

from jaxtune.errors import ConfigError
from jaxtune.model.config import ModelConfig
from jaxtune.model.linear import concat_kernels, dense, linear, register_concat, register_linear
from jaxtune.model.mlp import MLP, register_fused_mlp
from jaxtune.model.params import ParamSpec, Path, path_seed, param_specs
from jaxtune import quant
from jaxtune.lora_fused_product import fused_lora_product, pays_off
from jaxtune.lora_gated_down import JOINT, lora_gated_down, lora_gated_down_joint
from jaxtune import lora_gate_up, lora_projection
from jaxtune.sharding import constrain, shard_counts


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """What `apply` adds; the trainer builds it from the Axolotl keys named in each comment."""

    r: int = 8  # lora_r: rank of the update
    alpha: float = 16.0  # lora_alpha: the update is scaled by alpha / r (alpha / sqrt(r) with rslora)
    dropout: float = 0.0  # lora_dropout: dropout probability on the adapter's input
    # lora_target_modules: module names, matched as PEFT matches a list (the module's full HF name,
    # e.g. "model.layers.0.self_attn.q_proj", equals the name or ends with "." + name), or one
    # regular expression string, matched as PEFT matches a string (re.fullmatch on the full name).
    target_modules: tuple[str, ...] | str = ()
    target_linear: bool = False  # lora_target_linear: every linear projection except lm_head
    modules_to_save: tuple[str, ...] = ()  # lora_modules_to_save: trained in full, saved with the adapter
    use_rslora: bool = False  # peft_use_rslora: rank-stabilised scale alpha / sqrt(r)
    use_dora: bool = False  # peft_use_dora: weight-decomposed LoRA (a trained magnitude per output)

    def __post_init__(self):
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if isinstance(self.modules_to_save, (list, str)):
            names = (self.modules_to_save,) if isinstance(self.modules_to_save, str) else self.modules_to_save
            object.__setattr__(self, "modules_to_save", tuple(names))
        if not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"lora_r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules and not self.target_linear:
            raise ConfigError("LoRA needs lora_target_modules or lora_target_linear: true")
        if isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as e:
                raise ConfigError(f"lora_target_modules {self.target_modules!r} is not a valid regex: {e}") from e

    @property
    def scale(self) -> float:
        """The factor s in x@W + s·x@A@B."""
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


@struct.dataclass
class LoRA:
    """A kernel with a low-rank adapter. Shapes are for a stacked kernel `[L, *in, *out]`; inside
    the layer scan every array field has lost its leading `L`."""

    base: Any  # frozen kernel [L, *in, *out]: an array or a jaxtune.quant NF4 / Int8 leaf
    a: jax.Array  # [L, *in, r]
    b: jax.Array  # [L, r, *out]
    magnitude: jax.Array | None  # DoRA: [L, *out], the trained norm of each output feature's weights
    dropout_key: jax.Array | None  # [L] typed PRNG keys while training with dropout (with_dropout_keys)
    scale: float = struct.field(pytree_node=False)  # s = alpha / r, or alpha / sqrt(r)
    dropout: float = struct.field(pytree_node=False)  # dropout probability on the adapter input

    @property
    def rank(self) -> int:
        return self.a.shape[-1]


# ---------------------------------------------------------------------------------------------
# linear(x, LoRA)

_RANK_LETTERS = "rzyxwqjgeiopu"


@functools.cache
def _adapter_specs(spec: str) -> tuple[str, str, str, int]:
    """From the model's einsum (e.g. 'btd,dnh->btnh'): the specs of x@A, (x@A)@B and A@B, and how
    many leading kernel dims are the input side. The kernel's letters are its input letters
    (shared with x) followed by its output letters."""
    inputs, out = spec.split("->")
    x_s, w_s = inputs.split(",")
    in_letters = "".join(c for c in w_s if c in x_s)
    out_letters = w_s[len(in_letters):]
    lead = "".join(c for c in x_s if c not in in_letters)
    if not w_s.startswith(in_letters) or not out.endswith(out_letters) or out != lead + out_letters:
        raise ValueError(f"einsum {spec!r}: kernel must be [*in, *out] and the output [*batch, *out]")
    r = next(c for c in _RANK_LETTERS if c not in spec)
    return (f"{x_s},{in_letters}{r}->{lead}{r}", f"{lead}{r},{r}{out_letters}->{out}",
            f"{in_letters}{r},{r}{out_letters}->{w_s}", len(in_letters))


def _dropout(x: jax.Array, key: jax.Array | None, rate: float) -> jax.Array:
    """Inverted dropout as torch.nn.Dropout: zero with probability `rate`, scale kept values up."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def _column_norm(weight: jax.Array, in_axes: tuple[int, ...]) -> jax.Array:
    """L2 norm over a kernel's input axes: one per output feature, PEFT's `linalg.norm(W, dim=1)`
    on HF's `[out, in]` weight."""
    weight = weight.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(weight * weight, axis=in_axes))


def _lora_linear(x: jax.Array, w: LoRA, spec: str, dtype, residual: jax.Array | None = None) -> jax.Array:
    a_spec, b_spec, delta_spec, in_ndim = _adapter_specs(spec)
    x = x.astype(dtype)
    dropped = w.dropout_key is not None and w.dropout > 0.0
    if w.magnitude is None and not dropped and _takes_projection_kernel(x.shape, w, spec, in_ndim, dtype):
        return _projection_kernel(x, w, in_ndim, dtype, residual)
    base_w = quant.dequantize(w.base, dtype)
    x_lora = _dropout(x, w.dropout_key, w.dropout)
    xa = jnp.einsum(a_spec, x_lora, w.a.astype(dtype), preferred_element_type=dtype)
    if w.magnitude is None:
        # s is folded into B (an [r, out] multiply), and every product is written in `dtype`
        # (accumulated in float32), as PEFT does in bf16: a float32 [B, T, out] result would cost
        # a write and a read more. Widening projections (gate/up) with many tokens per step take
        # both products as one matmul over [x | xa] (lora_fused_product.py): fewer passes over
        # their wide output.
        scaled_b = (w.scale * w.b).astype(dtype)
        if pays_off(spec, x.shape, base_w.shape):
            out = fused_lora_product(spec, x, xa, base_w, scaled_b)
        else:
            lora_out = jnp.einsum(b_spec, xa, scaled_b, preferred_element_type=dtype)
            out = jnp.einsum(spec, x, base_w, preferred_element_type=dtype) + lora_out
        return out if residual is None else residual + out
    # DoRA, in float32. The norm needs W + s·AB, which exists only here, under stop_gradient.
    base_out = dense(x, base_w, spec, dtype)
    lora_out = jnp.einsum(b_spec, xa, w.b.astype(dtype), preferred_element_type=jnp.float32)
    delta = jnp.einsum(delta_spec, w.a.astype(jnp.float32), w.b.astype(jnp.float32))
    full = quant.dequantize(w.base, jnp.float32) + w.scale * delta
    norm = jax.lax.stop_gradient(_column_norm(full, tuple(range(in_ndim))))
    mag_scale = w.magnitude.astype(jnp.float32) / norm  # broadcasts over the output's trailing dims
    # PEFT reuses the base output when dropout is off; with dropout it multiplies the dropped
    # input by W again for the magnitude term.
    base_dropped = dense(x_lora, base_w, spec, dtype) if dropped else base_out
    out = base_out + (mag_scale - 1.0) * base_dropped + mag_scale * (w.scale * lora_out)
    return out if residual is None else residual + out.astype(dtype)  # float32 alone: `linear` adds a bias to it


def _takes_projection_kernel(x_shape: tuple[int, ...], w: LoRA, spec: str, in_ndim: int, dtype) -> bool:
    """Whether plain LoRA without dropout (the caller checks) goes through lora_projection.py's
    kernel: a dense base, x's input dimensions its last ones in the kernel's order (so both flatten
    to a matrix product), and the kernel taking the shapes."""
    if not isinstance(w.base, (jax.Array, np.ndarray)):
        return False
    x_s, w_s = spec.split("->")[0].split(",")
    if not x_s.endswith(w_s[:in_ndim]):
        return False
    tokens, n_in, n_out = lora_projection.flat_shapes(x_shape, w.base.shape, in_ndim)
    return lora_projection.takes(tokens, n_in, n_out, w.rank, dtype)


def _projection_kernel(x: jax.Array, w: LoRA, in_ndim: int, dtype, residual: jax.Array | None) -> jax.Array:
    """`residual + x@W + s·(x@A)@B` through lora_projection.py, x and the kernels flattened to
    matrices and the result shaped back."""
    tokens, n_in, n_out = lora_projection.flat_shapes(x.shape, w.base.shape, in_ndim)
    out_shape = x.shape[:x.ndim - in_ndim] + w.base.shape[in_ndim:]
    flat_residual = None if residual is None else residual.astype(dtype).reshape(tokens, n_out)
    out = lora_projection.projection(x.reshape(tokens, n_in), w.a.astype(dtype).reshape(n_in, w.rank),
                                     w.base.astype(dtype).reshape(n_in, n_out),
                                     (w.scale * w.b).astype(dtype).reshape(w.rank, n_out), flat_residual)
    return out.reshape(out_shape)


register_linear(LoRA, _lora_linear, takes_residual=True)


def _concat_lora(leaves: list[LoRA], in_ndim: int, out_shapes: list[tuple[int, ...]]) -> LoRA | None:
    """LoRA leaves side by side as one (`concat_outputs`, for the grouped q/k/v projection): bases
    concatenated, A's side by side `[*in, Σr]`, B's block-diagonal `[Σr, *lead, Σout]`, so that
    `(x@[A₁|A₂])@diag(B₁, B₂) = [x@A₁@B₁ | x@A₂@B₂]` exactly. Plain LoRA over dense bases with one
    scale only; None for DoRA, quantised bases, or dropout (each adapter draws its own mask)."""
    if not _concatenable(leaves):
        return None
    a, b = _side_by_side_adapters(leaves, out_shapes)
    first = leaves[0]
    return LoRA(base=concat_kernels([w.base for w in leaves], in_ndim, out_shapes), a=a, b=b,
                magnitude=None, dropout_key=None, scale=first.scale, dropout=first.dropout)


def _concatenable(leaves: list[LoRA]) -> bool:
    """Plain LoRA over dense bases of one dtype, one scale, no dropout (each adapter would draw its
    own mask)."""
    first = leaves[0]
    if any(w.magnitude is not None or (w.dropout_key is not None and w.dropout > 0.0)
           or not isinstance(w.base, (jax.Array, np.ndarray)) or w.scale != first.scale for w in leaves):
        return False
    return len({w.base.dtype for w in leaves}) == 1 and len({w.b.dtype for w in leaves}) == 1


def _side_by_side_adapters(leaves: list[LoRA], out_shapes: list[tuple[int, ...]]) -> tuple[jax.Array, jax.Array]:
    """(A's side by side `[*in, Σr]`, B's block-diagonal `[Σr, *lead, Σout]`), each B's output
    reshaped to its `out_shapes` entry and the blocks concatenated along the last dimension."""
    widths = [s[-1] for s in out_shapes]
    blocks = []
    for i, (w, shape) in enumerate(zip(leaves, out_shapes)):
        b = w.b.reshape(w.b.shape[:1] + tuple(shape))
        pad = [(0, 0)] * (b.ndim - 1) + [(sum(widths[:i]), sum(widths[i + 1:]))]
        blocks.append(jnp.pad(b, pad))
    return jnp.concatenate([w.a for w in leaves], axis=-1), jnp.concatenate(blocks, axis=0)


register_concat(LoRA, _concat_lora)


# Gate and up through one matmul (`_joint_gate_up`): on by default since measured in the 1B LoRA
# step on an H200 (+0.4% / +0.5% tokens/s interleaved, benchmarks/RESULTS.md, seventeenth round).
# Columns are grouped in chunks of `GATE_UP_CHUNK` (gate's chunk, then up's) so that a split of the
# mlp dimension over devices keeps each gate column with its up column, and so that the
# activation's backward kernel takes one chunk per program.
JOINT_GATE_UP = True
GATE_UP_CHUNK = 128


def _plain_lora_down(mlp: dict) -> LoRA | None:
    """down_proj's LoRA leaf where the MLP's fused forms take it: plain LoRA (no DoRA) without
    dropout (the adapter's input is h itself) and no biases on the three projections; else None."""
    down = mlp["down_proj"]["kernel"]
    if not isinstance(down, LoRA) or down.magnitude is not None or (down.dropout_key is not None and down.dropout > 0.0):
        return None
    if any(mlp[n].get("bias") is not None for n in ("gate_proj", "up_proj", "down_proj")):
        return None
    return down


def _mlp_with_lora_down(x: jax.Array, mlp: dict, hidden_act: str, dtype, residual=None) -> jax.Array | None:
    """The gated MLP with the activation and a LoRA down_proj as one function (lora_gated_down.py:
    the adapter's term of the activation's gradient is formed inside the activation's backward).
    Takes down_proj with plain LoRA (no DoRA, no dropout: the adapter's input is h itself) and no
    biases; None otherwise, and `gated_mlp` takes the per-projection path."""
    down = _plain_lora_down(mlp)
    if down is None:
        return None
    down_args = (quant.dequantize(down.base, dtype), down.a.astype(dtype), (down.scale * down.b).astype(dtype))
    gu = _joint_gate_up(x, mlp["gate_proj"]["kernel"], mlp["up_proj"]["kernel"], dtype)
    if gu is not None:
        return lora_gated_down_joint(gu, *down_args, hidden_act=hidden_act, residual=residual)
    gate = linear(x, mlp["gate_proj"]["kernel"], "btd,df->btf", dtype)
    up = linear(x, mlp["up_proj"]["kernel"], "btd,df->btf", dtype)
    return lora_gated_down(constrain(gate, MLP), constrain(up, MLP), *down_args, hidden_act=hidden_act,
                           residual=residual)


def _joint_gate_up(x: jax.Array, gate, up, dtype) -> jax.Array | None:
    """Gate and up as one `[B, T, F/c, 2c]` array (`lora_gated_down.JOINT`'s layout, c =
    `GATE_UP_CHUNK`) from one fused `[x | xa]` product over both (lora_fused_product.py: bases
    interleaved chunk by chunk inside it, A's side by side, B's block-diagonal), or None where
    `_takes_joint_gate_up` says no.

    Against two projections: x is concatenated with the adapters' inputs once instead of twice;
    the backward's `[dx | dxa]` comes from one matmul that already sums gate's and up's terms of
    x's gradient (two arrays fewer to write and add), and one `dxa@Aᵀ` for both adapters."""
    if not _takes_joint_gate_up(x.shape, gate, up):
        return None
    x, xa, sb = _joint_adapter_operands(x, gate, up, dtype)
    gu = fused_lora_product("btd,dkc->btkc", x, xa, (gate.base.astype(dtype), up.base.astype(dtype)), sb,
                            GATE_UP_CHUNK)
    return constrain(gu, JOINT)


def _takes_joint_gate_up(x_shape: tuple[int, ...], gate, up) -> bool:
    """Whether gate and up go through one product: JOINT_GATE_UP on, both plain LoRA over dense
    bases (`_concatenable`), F a multiple of c, the fused product paying (`pays_off`), and the
    chunks splitting over the mesh as the mlp dimension does."""
    if not JOINT_GATE_UP or not (isinstance(gate, LoRA) and isinstance(up, LoRA)):
        return False
    d, f = gate.base.shape
    c = GATE_UP_CHUNK
    if f % c or up.base.shape != (d, f) or not _concatenable([gate, up]):
        return False
    if not pays_off("btd,dkc->btkc", x_shape, (d, f // c, 2 * c)):
        return False
    b_t = x_shape[:2]
    return shard_counts(JOINT, b_t + (f // c, 2 * c))[2] == shard_counts(MLP, b_t + (f,))[2]


def _joint_adapter_operands(x: jax.Array, gate: LoRA, up: LoRA, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(x, both adapters' `x@A` side by side `[B, T, Σr]`, their s·B block-diagonal in the joint
    layout `[Σr, F/c, 2c]`), in `dtype`."""
    f = gate.base.shape[1]
    a, b = _side_by_side_adapters([gate, up], [(f // GATE_UP_CHUNK, GATE_UP_CHUNK)] * 2)
    x = x.astype(dtype)
    xa = jnp.einsum("btd,dr->btr", x, a.astype(dtype), preferred_element_type=dtype)
    return x, xa, (gate.scale * b).astype(dtype)


def _mlp_with_lora_gate_up(x: jax.Array, mlp: dict, hidden_act: str, dtype, residual=None) -> jax.Array | None:
    """The gated MLP with gate/up and the activation in one Hopper kernel (lora_gate_up.py; on a
    Hopper GPU unless `lora_gate_up.KERNEL` says otherwise): where the joint gate/up product is taken
    (`_takes_joint_gate_up`), down_proj carries plain LoRA without dropout (its adapter's input is
    h, which the kernel writes), there are no biases and the kernel takes the shapes; None
    otherwise, and the next registered form runs."""
    gate, up, down = mlp["gate_proj"]["kernel"], mlp["up_proj"]["kernel"], _plain_lora_down(mlp)
    if down is None or not _takes_joint_gate_up(x.shape, gate, up):
        return None
    rank = gate.a.shape[-1] + up.a.shape[-1]
    if not lora_gate_up.takes(x.shape, gate.base.shape[1], GATE_UP_CHUNK, rank, dtype, hidden_act):
        return None
    x, xa, sb = _joint_adapter_operands(x, gate, up, dtype)
    return lora_gate_up.gate_up_mlp(x, xa, gate.base.astype(dtype), up.base.astype(dtype), sb,
                                    quant.dequantize(down.base, dtype), down.a.astype(dtype),
                                    (down.scale * down.b).astype(dtype), hidden_act=hidden_act, chunk=GATE_UP_CHUNK,
                                    residual=residual)


register_fused_mlp(_mlp_with_lora_gate_up)


register_fused_mlp(_mlp_with_lora_down)


# ---------------------------------------------------------------------------------------------
# Which modules: PEFT's matching on HF module names

@dataclasses.dataclass(frozen=True)
class _Module:
    name: str  # HF module name, e.g. "model.layers.3.self_attn.q_proj"
    path: Path  # the param it owns, e.g. ('layers', 'self_attn', 'q_proj', 'kernel')
    layer: int | None


def _modules(model_cfg: ModelConfig) -> list[_Module]:
    """Every HF module with a weight (or bias) in this model, one entry per layer and tensor."""
    from jaxtune.converters.hf import key_table  # local: converters import the model, not lora

    out = []
    for entry in key_table(model_cfg):
        module, _, _ = entry.hf_name.rpartition(".")
        out.append(_Module(module, entry.path, entry.layer))
    return out


def _name_matches(name: str, module: str) -> bool:
    return module == name or module.endswith("." + name)


def _is_projection(path: Path, model_cfg: ModelConfig) -> bool:
    return path[-1] == "kernel" and param_specs(model_cfg)[path].in_ndim is not None


def _covering(matched: list[_Module], what: str, model_cfg: ModelConfig) -> list[Path]:
    """Params of the matched modules, each of which must be matched in every layer."""
    layers: dict[Path, set] = {}
    names: dict[Path, str] = {}
    for m in matched:
        layers.setdefault(m.path, set()).add(m.layer)
        names[m.path] = m.name if m.layer is None else m.name.replace(f".{m.layer}.", ".*.", 1)
    for path, got in layers.items():
        if None not in got and len(got) != model_cfg.num_layers:
            name = names[path]
            raise ConfigError(
                f"{what} matches {name} in layers {sorted(got)} only, of {model_cfg.num_layers}; "
                "jaxtune stacks layers, so LoRA and modules_to_save apply to all layers or none")
    return sorted(layers)


def modules_to_save_paths(cfg: LoraConfig, model_cfg: ModelConfig) -> list[Path]:
    """The params trained in full because their module is in `modules_to_save`."""
    modules = _modules(model_cfg)
    paths: list[Path] = []
    for name in cfg.modules_to_save:
        matched = [m for m in modules if _name_matches(name, m.name)]
        if not matched:
            raise ConfigError(
                f"lora_modules_to_save: {name!r} matches no module of this {model_cfg.family} model; "
                f"modules are e.g. {', '.join(sorted({_short(m.name) for m in modules}))}")
        paths += _covering(matched, f"lora_modules_to_save {name!r}", model_cfg)
    if model_cfg.tie_word_embeddings and any(p[0] in ("embed_tokens", "lm_head") for p in paths):
        raise ConfigError(
            "lora_modules_to_save with embed_tokens or lm_head is not supported for a model with tied "
            "embeddings (tie_word_embeddings: true): PEFT then trains a separate copy of one of the tied "
            "matrices, which jaxtune's tied model cannot express")
    return sorted(set(paths))


def _short(module: str) -> str:
    return module.rpartition(".")[2]


def target_paths(cfg: LoraConfig, model_cfg: ModelConfig) -> list[Path]:
    """The stacked projection kernels that get LoRA, or a ConfigError naming what does not fit."""
    modules = [m for m in _modules(model_cfg) if m.path[-1] != "bias"]
    excluded = set(modules_to_save_paths(cfg, model_cfg))  # PEFT never targets a module it saves
    matched: list[_Module] = []
    if isinstance(cfg.target_modules, str):
        matched = [m for m in modules if re.fullmatch(cfg.target_modules, m.name)]
        if not matched:
            raise ConfigError(f"lora_target_modules regex {cfg.target_modules!r} matches no module; module "
                              f"names look like {modules[len(modules) // 2].name!r}")
    else:
        for name in cfg.target_modules:
            hits = [m for m in modules if _name_matches(name, m.name)]
            if not hits:
                raise ConfigError(
                    f"lora_target_modules: {name!r} matches no module of this {model_cfg.family} model; linear "
                    f"modules are {', '.join(sorted({_short(m.name) for m in modules if _is_projection(m.path, model_cfg) and m.layer is not None}))}")
            matched += hits
    if cfg.target_linear:
        matched += [m for m in modules if _is_projection(m.path, model_cfg) and m.layer is not None]
    matched = [m for m in matched if m.path not in excluded]
    for m in matched:
        if not _is_projection(m.path, model_cfg):
            raise ConfigError(f"lora_target_modules matches {m.name}, which is not a linear projection")
        if m.layer is None:
            raise ConfigError(
                f"lora_target_modules matches {m.name}: LoRA on {_short(m.name)} is not supported (only the "
                "decoder layers' projections); list it in lora_modules_to_save to train it in full")
    paths = _covering(matched, "lora_target_modules", model_cfg)
    if not paths:
        raise ConfigError("lora_target_modules selects no module once lora_modules_to_save is excluded")
    return paths


# ---------------------------------------------------------------------------------------------
# The transform

def init_adapter(base, spec: ParamSpec, cfg: LoraConfig, key: jax.Array) -> LoRA:
    """A fresh LoRA leaf on `base` (shape `spec.shape`), initialised as PEFT does."""
    in_shape = spec.shape[1:1 + spec.in_ndim]
    out_shape = spec.shape[1 + spec.in_ndim:]
    # torch's kaiming_uniform_(a=√5) on lora_A.weight [r, in]: gain √(2/(1+5)), bound
    # gain·√(3/fan_in) = 1/√fan_in.
    bound = 1.0 / math.sqrt(math.prod(in_shape))
    a = jax.random.uniform(key, (spec.shape[0], *in_shape, cfg.r), jnp.float32, -bound, bound)
    b = jnp.zeros((spec.shape[0], cfg.r, *out_shape), jnp.float32)
    magnitude = None
    if cfg.use_dora:  # B = 0, so ‖W + s·AB‖ = ‖W‖
        magnitude = _column_norm(quant.dequantize(base, jnp.float32), tuple(range(1, 1 + spec.in_ndim)))
    return LoRA(base=base, a=a, b=b, magnitude=magnitude, dropout_key=None, scale=cfg.scale, dropout=cfg.dropout)


def apply(params: dict, cfg: LoraConfig, model_cfg: ModelConfig, rng: jax.Array) -> dict:
    """`params` with each target kernel replaced by a LoRA leaf (bases kept as they are: bf16,
    float32 or quantised). Each leaf's key is folded in from its path, so targets are independent."""
    specs = param_specs(model_cfg)
    flat = traverse_util.flatten_dict(params)
    for path in modules_to_save_paths(cfg, model_cfg):
        if quant.is_quantized(flat.get(path)) or isinstance(flat.get(path), LoRA):
            raise ConfigError(f"lora_modules_to_save: {'/'.join(path)} is quantised or has LoRA; it cannot be trained in full")
    for path in target_paths(cfg, model_cfg):
        base = flat.get(path)
        if base is None:
            raise ConfigError(f"params have no {'/'.join(path)} to put LoRA on")
        if isinstance(base, LoRA):
            raise ConfigError(f"{'/'.join(path)} already has a LoRA adapter")
        if tuple(base.shape) != specs[path].shape:
            raise ConfigError(f"{'/'.join(path)} has shape {tuple(base.shape)}; the model config says {specs[path].shape}")
        flat[path] = init_adapter(base, specs[path], cfg, jax.random.fold_in(rng, path_seed(path)))
    return traverse_util.unflatten_dict(flat)


def is_lora(leaf) -> bool:
    return isinstance(leaf, LoRA)


def lora_leaves(params: dict) -> dict[Path, LoRA]:
    return {p: leaf for p, leaf in traverse_util.flatten_dict(params).items() if isinstance(leaf, LoRA)}


def with_dropout_keys(params: dict, key: jax.Array) -> dict:
    """`params` with fresh per-layer dropout keys in every LoRA leaf whose dropout is > 0.

    Call it inside the jitted step on the combined params, with a key unique to the step and
    micro-batch (e.g. `fold_in(fold_in(base, step), micro)`). Key data (uint32) is accepted too.
    """
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    flat = traverse_util.flatten_dict(params)
    for path, leaf in flat.items():
        if isinstance(leaf, LoRA) and leaf.dropout > 0.0:
            keys = jax.random.split(jax.random.fold_in(key, path_seed(path)), leaf.a.shape[0])
            flat[path] = leaf.replace(dropout_key=keys)
    return traverse_util.unflatten_dict(flat)


def trainable_mask(params: dict, modules_to_save: tuple[str, ...] | LoraConfig = ()) -> dict:
    """The params pytree with a bool per array leaf: True for adapter factors, DoRA magnitudes and
    the params of `modules_to_save` (names as in LoraConfig, already validated by `apply`)."""
    names = modules_to_save.modules_to_save if isinstance(modules_to_save, LoraConfig) else tuple(modules_to_save)
    last = {n.rpartition(".")[2] for n in names}

    def mask(path: Path, leaf):
        if isinstance(leaf, LoRA):
            return leaf.replace(base=jax.tree.map(lambda _: False, leaf.base), a=True, b=True,
                                magnitude=None if leaf.magnitude is None else True,
                                dropout_key=None if leaf.dropout_key is None else False)
        if quant.is_quantized(leaf):
            return jax.tree.map(lambda _: False, leaf)
        return any(part in last for part in path[:-1])

    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({p: mask(p, leaf) for p, leaf in flat.items()})


def split_trainable(params: dict, modules_to_save: tuple[str, ...] | LoraConfig = ()) -> tuple[dict, dict]:
    """(trainable, frozen) by `trainable_mask`; `jaxtune.train.state.combine` joins them again."""
    from jaxtune.train.state import partition  # local: the trainer package depends on nothing here

    return partition(params, trainable_mask(params, modules_to_save))


def logical_axes(params: dict, model_cfg: ModelConfig) -> dict:
    """Logical axis names for every array of `params` (LoRA and quantised leaves included), for
    `jaxtune.sharding.tree_shardings`. Adapters shard like their base: A keeps the base's input
    axes, B its output axes, and the rank axis is `lora_rank`."""
    specs = param_specs(model_cfg)

    def axes(path: Path, leaf):
        base_axes = specs[path].axes
        if quant.is_quantized(leaf):
            return quant.quantized_axes(leaf, base_axes)
        if not isinstance(leaf, LoRA):
            return base_axes
        n_in = leaf.a.ndim - 2
        in_axes, out_axes = base_axes[1:1 + n_in], base_axes[1 + n_in:]
        return leaf.replace(
            base=quant.quantized_axes(leaf.base, base_axes) if quant.is_quantized(leaf.base) else base_axes,
            a=(base_axes[0], *in_axes, "lora_rank"), b=(base_axes[0], "lora_rank", *out_axes),
            magnitude=None if leaf.magnitude is None else (base_axes[0], *out_axes),
            dropout_key=None if leaf.dropout_key is None else (base_axes[0],))

    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({p: axes(p, leaf) for p, leaf in flat.items()})


# ---------------------------------------------------------------------------------------------
# Merging for export

def _merged_layer(leaf: LoRA, dtype) -> jax.Array:
    """W + s·AB (DoRA: m/‖W + s·AB‖ · (W + s·AB)) for one layer's slice, computed in float32."""
    n_in = leaf.a.ndim - 1
    w = quant.dequantize(leaf.base, jnp.float32)
    a_ir = leaf.a.astype(jnp.float32).reshape(-1, leaf.rank)
    b_ro = leaf.b.astype(jnp.float32).reshape(leaf.rank, -1)
    merged = w + leaf.scale * (a_ir @ b_ro).reshape(w.shape)
    if leaf.magnitude is not None:
        merged = merged * (leaf.magnitude.astype(jnp.float32) / _column_norm(merged, tuple(range(n_in))))
    return merged.astype(dtype)


@functools.partial(jax.jit, static_argnames="dtype")
def _merge_stacked(leaf: LoRA, dtype) -> jax.Array:
    # One layer at a time, so only one layer's float32 weight exists besides the result.
    return jax.lax.map(lambda layer: _merged_layer(layer, dtype), leaf.replace(dropout_key=None))


@functools.partial(jax.jit, static_argnames="dtype")
def _dequantize_stacked(leaf, dtype) -> jax.Array:
    return jax.lax.map(lambda layer: quant.dequantize(layer, dtype), leaf)


def _base_dtype(base) -> np.dtype:
    return jnp.dtype(base.dtype)


def merge(params: dict, dtype=None) -> dict:
    """Plain dense params: every LoRA leaf becomes its merged kernel and every quantised leaf its
    dequantised kernel, in `dtype` (default: each base's own dtype). For export (`save_hf`)."""
    flat = traverse_util.flatten_dict(params)
    for path, leaf in flat.items():
        if isinstance(leaf, LoRA):
            out = jnp.dtype(dtype) if dtype is not None else _base_dtype(leaf.base)
            flat[path] = _merge_stacked(leaf, out)
        elif quant.is_quantized(leaf):
            out = jnp.dtype(dtype) if dtype is not None else _base_dtype(leaf)
            flat[path] = _dequantize_stacked(leaf, out)
        elif dtype is not None:
            flat[path] = leaf.astype(dtype)
    return traverse_util.unflatten_dict(flat)
