"""Training throughput: jaxtune vs transformers + PEFT on the same GPU, same shapes, same run.

    python benchmarks/train_throughput.py --cases 1b-lora 1b-full [--steps 10] [--out DIR]
    python benchmarks/train_throughput.py --cases 1b-lora --sides jaxtune --meshes 1 data=2 tensor=2
    python benchmarks/train_throughput.py --cases 1b-lora-ckpt --sides jaxtune --meshes sequence=2 \
        --batch 1 --seq 32768 65536 131072

Each side runs in its own process (both frameworks want the whole GPU), on identical
random-weight Llama-shaped models and random token batches: bf16 compute, AdamW (fused on the
PyTorch side), LoRA r=16 α=32 on every linear layer, dropout 0, SDPA/cuDNN attention. Prints
tokens/s, peak device memory (jaxtune: also the step's own bytes by XLA's buffer assignment), MFU,
compile/first-step time and the jaxtune/PyTorch ratio; on an NVIDIA GPU also each side's energy
per token, average power and mean SM clock over the timed steps (gpu_power.py: the 1B LoRA step
runs at the board's power limit, so its clock, and with it its speed, depends on the energy used).
`--meshes` also runs jaxtune on several GPUs (the trainer's sharding and ring attention) and
prints each mesh's tokens/s per GPU against the first mesh's (scaling efficiency).
`--tiny` shrinks every case to run on a CPU (a smoke test of both code paths, not a figure).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

from gpu_power import PowerMeter  # benchmarks/, next to this script

# name → (model shape, seq, micro-batch, adapter, gradient checkpointing)
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8,
               head_dim=64, vocab_size=128256),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
               head_dim=128, vocab_size=128256),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=16, vocab_size=256),
}


@dataclasses.dataclass(frozen=True)
class Case:
    shape: str
    seq: int
    batch: int
    adapter: str | None  # None (full), "lora", "qlora"
    checkpointing: bool


CASES = {
    "1b-lora": Case("1b", 2048, 4, "lora", False),
    "1b-full": Case("1b", 2048, 4, None, False),
    "1b-lora-ckpt": Case("1b", 2048, 4, "lora", True),  # with --seq/--batch for long context
    "8b-lora-ckpt": Case("8b", 4096, 1, "lora", True),
    "8b-qlora-ckpt": Case("8b", 4096, 1, "qlora", True),
    "8b-full": Case("8b", 4096, 1, None, False),  # issue 11 (a): with --meshes fsdp=8
    "8b-lora-long": Case("8b", 65536, 1, "lora", True),  # issue 11 (b): data=2,tensor=2,sequence=2
}
LORA_R, LORA_ALPHA = 16, 32
LR = 1e-4


@dataclasses.dataclass(frozen=True)
class JaxtuneKnobs:
    """The jaxtune settings a run varies (command-line flags), for every case alike."""

    attention: str = "cudnn"
    ce: str = "fused"  # cross-entropy: "fused" (gradient in the forward pass) or "plain" (autodiff)
    ce_chunk: int | None = None  # tokens per cross-entropy chunk (None: the trainer's, by vocab size)
    ce_logits: str | None = None  # what the lm_head matmul writes in the cross-entropy (None: the trainer's)
    remat: str | None = None  # policy for the checkpointing cases (None: nothing_saveable)
    scan_unroll: int = 1  # layers per iteration of the layer loop (1: the trainer's default loop;
    # the number of layers: unrolled, as `scan_layers: false`)
    gate_up_kernel: str | None = None  # LoRA gate/up + activation in one Hopper kernel: "on" or "off"; None: the
    # trainer's (jaxtune/lora_gate_up.py KERNEL: on a Hopper GPU where the joint gate/up product is taken)
    gate_up_cluster: int | None = None  # that kernel's CTAs per cluster (None: jaxtune/lora_gate_up.py CLUSTER)
    joint_gate_up: str | None = None  # LoRA gate/up as one matmul: "on" or "off" (two projections); None: the
    # trainer's (jaxtune/lora.py JOINT_GATE_UP)
    gate_up_chunk: int | None = None  # columns per chunk of that matmul (None: jaxtune/lora.py GATE_UP_CHUNK)
    lora_kernel: str | None = None  # plain LoRA projections (and the residual adds after o_proj and down_proj)
    # through one Hopper kernel: "auto" or "off"; None: the trainer's (jaxtune/lora_projection.py KERNEL)
    lora_cluster: int | None = None  # that kernel's CTAs per cluster (None: jaxtune/lora_projection.py CLUSTER)
    lora_cooperative_k: int | None = None  # that kernel's cooperative tiles from this K (None: lora_projection.py's)
    activation_grad_kernel: str | None = None  # down_proj's backward and the activation's in that kernel: "on" or
    # "off"; None: the trainer's (jaxtune/lora_projection.py ACTIVATION_GRAD)
    norm_kernels: str | None = None  # the residual stream's norms: "auto" (our kernels on a GPU) or "off"
    # (XLA's fusions of the plain form); None: the trainer's (jaxtune/model/norm.py KERNELS)

    def flags(self) -> list[str]:
        """The same knobs as command-line flags (for the worker processes): each field is its flag
        (`ce_chunk` → `--ce-chunk`), passed where it differs from the field's default (attention
        and the cross-entropy always)."""
        flags = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in ("attention", "ce") or value != field.default:
                flags += ["--" + field.name.replace("_", "-"), str(value)]
        return flags


def flops_per_token(shape: dict, seq: int) -> float:
    """Model FLOPs per trained token: 6·N for the matmuls plus causal attention (fwd + bwd)."""
    d, f, L, v = shape["hidden_size"], shape["intermediate_size"], shape["num_layers"], shape["vocab_size"]
    q, kv = shape["num_heads"] * shape["head_dim"], shape["num_kv_heads"] * shape["head_dim"]
    n = L * (d * (2 * q + 2 * kv) + 3 * d * f) + d * v
    attention = L * 6 * seq * q  # 2·2·S·q per token forward, halved by causality, ×3 with backward
    return 6 * n + attention


# ------------------------------------------------------------------------------------- jaxtune
@dataclasses.dataclass
class JaxtuneStep:
    """The jaxtune side of a case on a mesh, before any array exists: how to make the params, where
    every array lives, and the jitted train step. Both the timed run and `--aot` start from it."""

    model_cfg: object
    mesh: object
    rules: dict
    make_params: object  # key -> params (base, quantised, with adapters), jittable
    shardings: dict  # NamedSharding per params leaf
    mask: dict  # trainable per params leaf
    tx: object
    state_sh: object
    batch_sh: object
    settings: object
    rows: int  # global rows per step
    step: object  # jitted train_step(state, frozen, batch)
    split_frozen: bool  # frozen layer params come split per layer (unrolled, as scan_layers: false)

    def compile(self, state, frozen, batch):
        from jaxtune.sharding import activation_sharding

        with activation_sharding(self.mesh, self.rules):  # activations are constrained while tracing
            return self.step.lower(state, frozen, batch).compile()


def plan_jaxtune(case: Case, shape: dict, steps: int, mesh_sizes: dict, knobs: JaxtuneKnobs) -> JaxtuneStep:
    """`mesh_sizes` (e.g. {"data": 2}) spreads the step over that many of the visible devices as the
    trainer does (params and optimizer state by the sharding rules, rows over data×fsdp, length
    over sequence); `case.batch` is rows per data-parallel shard (Axolotl's micro_batch_size)."""
    import math

    import jax
    import jax.numpy as jnp

    from jaxtune import lora, quant
    from jaxtune.mesh import make_mesh
    from jaxtune.model.config import ModelConfig
    from jaxtune.model.layer_list import split_layer_shardings
    from jaxtune.model.params import init_params
    from jaxtune.sharding import merged_rules, tree_shardings
    from jaxtune.train.optimizer import OptimizerSettings, make_optimizer
    from jaxtune.train.placement import batch_sharding, params_shardings, state_shardings
    from jaxtune.train.state import partition
    from jaxtune.train.step import StepSettings, make_train_step

    cfg = ModelConfig(family="llama", **shape)
    if knobs.joint_gate_up or knobs.gate_up_chunk:
        from jaxtune import lora

        if knobs.joint_gate_up:
            lora.JOINT_GATE_UP = knobs.joint_gate_up == "on"
        if knobs.gate_up_chunk:
            lora.GATE_UP_CHUNK = knobs.gate_up_chunk
    if knobs.norm_kernels:
        from jaxtune.model import norm

        norm.KERNELS = knobs.norm_kernels
    if knobs.lora_kernel or knobs.lora_cluster or knobs.lora_cooperative_k or knobs.activation_grad_kernel:
        from jaxtune import lora_projection

        lora_projection.KERNEL = knobs.lora_kernel or lora_projection.KERNEL
        lora_projection.CLUSTER = knobs.lora_cluster or lora_projection.CLUSTER
        lora_projection.COOPERATIVE_K = knobs.lora_cooperative_k or lora_projection.COOPERATIVE_K
        if knobs.activation_grad_kernel:
            lora_projection.ACTIVATION_GRAD = knobs.activation_grad_kernel == "on"
    if knobs.gate_up_kernel == "off":
        from jaxtune import lora_gate_up

        lora_gate_up.KERNEL = "off"
    if knobs.gate_up_cluster:
        from jaxtune import lora_gate_up

        lora_gate_up.CLUSTER = knobs.gate_up_cluster
    if knobs.gate_up_kernel == "on":  # asked for: a case it cannot take is an error, not a silent fallback
        from jaxtune import lora_gate_up
        from jaxtune.kernels.gate_up_activation_mosaic import ADAPTER_K, supports
        from jaxtune.lora_fused_product import pays_off

        lora_gate_up.KERNEL = "auto" if jax.default_backend() == "gpu" else "interpret"
        tokens, d, f = case.batch * case.seq, cfg.hidden_size, cfg.intermediate_size
        why = supports(tokens, d, f, lora.GATE_UP_CHUNK, ADAPTER_K, jnp.bfloat16, cfg.hidden_act,
                       lora_gate_up.CLUSTER) if case.adapter == "lora" else "not a LoRA case"
        if why is None and 2 * LORA_R > ADAPTER_K:
            why = f"rank {LORA_R}: gate's and up's adapters need 2 x {LORA_R} <= {ADAPTER_K}"
        c = lora.GATE_UP_CHUNK
        if why is None and not (lora.JOINT_GATE_UP and pays_off("btd,dkc->btkc", (case.batch, case.seq, d),
                                                                (d, f // c, 2 * c))):
            why = "gate and up do not go through one product here (lora.py's JOINT_GATE_UP path, which the kernel replaces)"
        if why is None and mesh_sizes and math.prod(mesh_sizes.values()) > 1:
            why = "a mesh of more than one device (the kernel runs unsharded only)"
        if why is not None:
            raise SystemExit(f"--gate-up-kernel: the gate/up kernel does not take this case ({case}): {why}")
    n_devices = math.prod(mesh_sizes.values()) if mesh_sizes else 1
    mesh = make_mesh({"data": 1, **mesh_sizes}, devices=jax.devices()[:n_devices])
    rules = merged_rules()
    lcfg = lora.LoraConfig(r=LORA_R, alpha=LORA_ALPHA, target_linear=True)

    def make_params(key):
        if case.adapter == "qlora":
            params = quantized_random_params(cfg, key, quant.QuantConfig(bits=4, double_quant=True))
        else:
            params = init_params(cfg, key, dtype=jnp.bfloat16 if case.adapter else jnp.float32)
        return lora.apply(params, lcfg, cfg, jax.random.fold_in(key, 1)) if case.adapter else params

    abstract = jax.eval_shape(make_params, jax.random.key(0))
    if case.adapter:
        shardings = tree_shardings(lora.logical_axes(abstract, cfg), abstract, mesh, rules)
        mask = lora.trainable_mask(abstract)
    else:
        shardings = params_shardings(cfg, mesh, rules)
        mask = jax.tree.map(lambda _: True, abstract)
    trainable_sh, frozen_sh = partition(shardings, mask)
    tx, schedule = make_optimizer(OptimizerSettings(learning_rate=LR, max_grad_norm=1.0, schedule="constant"), steps)
    state_sh = state_shardings(trainable_sh, tx, partition(abstract, mask)[0], mesh)
    batch_sh = batch_sharding(mesh, rules)
    attention = knobs.attention
    if mesh.shape["sequence"] > 1:
        attention = "ring"
    elif jax.default_backend() == "cpu" and attention == "cudnn":
        attention = "xla"
    settings = StepSettings(dtype=jnp.bfloat16, attention=attention, ce_fused=knobs.ce == "fused",
                            ce_chunk_tokens=knobs.ce_chunk, ce_logits_dtype=knobs.ce_logits,
                            scan_unroll=knobs.scan_unroll,
                            remat=(knobs.remat or "nothing_saveable") if case.checkpointing else None,
                            packed=False)  # one sequence per row, as the trainer with sample_packing: false
    split_frozen = knobs.scan_unroll >= cfg.num_layers  # as the trainer with scan_layers: false
    if split_frozen:
        frozen_sh = split_layer_shardings(frozen_sh, cfg.num_layers)
    step = jax.jit(make_train_step(cfg, tx, schedule, settings), in_shardings=(state_sh, frozen_sh, batch_sh),
                   out_shardings=(state_sh, None), donate_argnums=(0,))
    return JaxtuneStep(cfg, mesh, rules, make_params, shardings, mask, tx, state_sh, batch_sh, settings,
                       case.batch * mesh.shape["data"] * mesh.shape["fsdp"], step, split_frozen)


def quantized_random_params(cfg, key, qcfg):
    """Random bf16 params with every projection kernel born quantised, one layer's slice at a time
    (`lax.map`), so no bf16 copy of the stacked kernels exists: as the trainer's streaming load
    (`quant.quantize_stream`), the device then holds at most one bf16 slice besides the NF4 model.
    Initialising the whole bf16 model first apparently set the QLoRA case's peak: 13.6 GiB on the
    H200 with and without a remat policy that adds 2.5 GiB to the step, whose own XLA estimate is
    8.9 GiB."""
    import jax
    import jax.numpy as jnp
    from flax import traverse_util

    from jaxtune import quant
    from jaxtune.model.params import init_leaf, param_specs, path_seed

    targets = set(quant.quantized_paths(cfg))
    flat = {}
    for path, spec in param_specs(cfg).items():
        key_path = jax.random.fold_in(key, path_seed(path))
        if path not in targets:
            flat[path] = init_leaf(cfg, spec, key_path, jnp.bfloat16)
            continue

        def one_layer(layer_key, spec=spec):
            w = init_leaf(cfg, spec, layer_key, jnp.bfloat16, shape=spec.shape[1:])
            return quant.quantize_kernel(w, spec.in_ndim, qcfg, stacked=False)

        flat[path] = jax.lax.map(one_layer, jax.random.split(key_path, spec.shape[0]))
    return traverse_util.unflatten_dict(flat)


def batch_names(plan: JaxtuneStep) -> list[str]:
    """With context parallelism the trainer's batches carry next-token targets computed in order."""
    return ["input_ids", "labels", "segment_ids", "positions"] + (["targets"] if plan.mesh.shape["sequence"] > 1 else [])


def run_jaxtune(case: Case, shape: dict, steps: int, mesh_sizes: dict | None = None,
                knobs: JaxtuneKnobs = JaxtuneKnobs(), profile_dir: str | None = None) -> dict:
    """One jaxtune worker: the planned step on real (random) params and tokens, timed."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxtune.kernels.ring_attention import zigzag_permutation
    from jaxtune.model.layer_list import split_layers
    from jaxtune.train.loss import next_token_targets
    from jaxtune.train.placement import create_state
    from jaxtune.train.state import partition

    plan = plan_jaxtune(case, shape, steps, dict(mesh_sizes or {}), knobs)
    if case.adapter == "qlora":  # op by op, so only one layer's bf16 kernel exists at a time (in
        # one jit, XLA's buffer assignment keeps every kernel's quantisation temporaries apart)
        params = jax.device_put(plan.make_params(jax.random.key(0)), plan.shardings)
    else:
        params = jax.jit(plan.make_params, out_shardings=plan.shardings)(jax.random.key(0))
    trainable, frozen = partition(params, plan.mask)
    del params
    if plan.split_frozen:
        frozen = split_layers(frozen, donate=True)
    frozen_bytes = sum(x.nbytes for x in jax.tree.leaves(frozen))
    state = create_state(trainable, plan.tx, jax.random.key(2), plan.state_sh)
    del trainable
    ids = np.asarray(jax.random.randint(jax.random.key(3), (plan.rows, case.seq), 0, shape["vocab_size"], jnp.int32))
    segments = np.ones_like(ids)
    columns = dict(input_ids=ids, labels=ids, segment_ids=segments,
                   positions=np.broadcast_to(np.arange(case.seq, dtype=np.int32), ids.shape),
                   targets=np.asarray(next_token_targets(ids, segments)))
    order = np.arange(case.seq)
    if plan.mesh.shape["sequence"] > 1:  # the trainer's data path: targets in token order, then zigzag
        order = zigzag_permutation(case.seq, plan.mesh.shape["sequence"])
    batch = jax.device_put({name: columns[name][None][..., order] for name in batch_names(plan)}, plan.batch_sh)
    start = time.perf_counter()
    compiled = plan.compile(state, frozen, batch)
    compile_s = time.perf_counter() - start
    step_gib = step_bytes(compiled)["total"] / 2**30
    for _ in range(2):  # warm-up
        state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready(metrics)
    with PowerMeter(nvml=plan.mesh.size == 1 and jax.default_backend() == "gpu") as power:  # one GPU's counter
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = compiled(state, frozen, batch)
        jax.block_until_ready(metrics)
        seconds = time.perf_counter() - start
    if profile_dir:  # a few more steps under the profiler, summarised by kernel
        from profile_summary import summarize

        with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
            for _ in range(3):
                state, metrics = compiled(state, frozen, batch)
            jax.block_until_ready(metrics)
        print(summarize(profile_dir, steps=3, top=60), flush=True)
    peak = max((d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in plan.mesh.devices.flat)
    return dict(tokens_per_second=steps * plan.rows * case.seq / seconds, step_ms=1000 * seconds / steps,
                peak_gib=peak / 2**30, step_gib=step_gib, compile_s=compile_s, devices=plan.mesh.size, mesh=dict(plan.mesh.shape),
                seq=case.seq, global_rows=plan.rows, attention=plan.settings.attention,
                loss=float(metrics["loss"]), frozen_gib=frozen_bytes / 2**30,
                frozen_bytes_per_param=frozen_bytes / plan.model_cfg.num_params,
                **power.result(steps, steps * plan.rows * case.seq))


def compile_ahead_of_time(case: Case, shape: dict, steps: int, mesh_sizes: dict | None, knobs: JaxtuneKnobs) -> dict:
    """The planned step lowered and compiled from abstract arrays (nothing is allocated), with
    XLA's per-device memory estimate and the collectives it holds. On CPU devices
    (XLA_FLAGS=--xla_force_host_platform_device_count=N) this checks a pod-sized config before its
    GPUs are at hand; the CPU compiler's buffer assignment is an estimate of the GPU's."""
    import collections
    import re

    import jax
    import jax.numpy as jnp

    from jaxtune.model.layer_list import split_layers
    from jaxtune.train.state import init_state, partition

    plan = plan_jaxtune(case, shape, steps, dict(mesh_sizes or {}), knobs)
    trainable, frozen = partition(jax.eval_shape(plan.make_params, jax.random.key(0)), plan.mask)
    _, frozen_sh = partition(plan.shardings, plan.mask)
    placed = lambda tree, sh: jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, sh)
    state = placed(jax.eval_shape(lambda t: init_state(t, plan.tx, jax.random.key(2)), trainable), plan.state_sh)
    batch = {n: jax.ShapeDtypeStruct((1, plan.rows, case.seq), jnp.int32, sharding=plan.batch_sh)
             for n in batch_names(plan)}
    start = time.perf_counter()
    frozen = placed(frozen, frozen_sh)
    if plan.split_frozen:
        frozen = split_layers(frozen)
    compiled = plan.compile(state, frozen, batch)
    memory = step_bytes(compiled)
    collectives = collections.Counter(re.findall(
        r"(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(", compiled.as_text()))
    gib = lambda b: b / 2**30
    return dict(aot=True, backend=jax.default_backend(), devices=plan.mesh.size, mesh=dict(plan.mesh.shape),
                seq=case.seq, global_rows=plan.rows, attention=plan.settings.attention,
                compile_s=time.perf_counter() - start,
                **{f"{name}_gib": gib(b) for name, b in memory.items() if name != "total"},
                peak_estimate_gib=gib(memory["total"]), collectives=dict(collectives))


def step_bytes(compiled) -> dict[str, int]:
    """What XLA's buffer assignment gives the compiled step per device: arguments, outputs, aliased
    (donated) bytes, temporaries and their total (the step's own peak, before fragmentation)."""
    m = compiled.memory_analysis()
    parts = dict(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes,
                 aliased=m.alias_size_in_bytes, temp=m.temp_size_in_bytes)
    return dict(parts, total=parts["arguments"] + parts["outputs"] - parts["aliased"] + parts["temp"])


# ------------------------------------------------------------------------------------- PyTorch
def run_torch(case: Case, shape: dict, steps: int) -> dict:
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf_cfg = transformers.LlamaConfig(
        vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_heads"], num_key_value_heads=shape["num_kv_heads"],
        head_dim=shape["head_dim"], max_position_embeddings=max(case.seq, 128))
    torch.manual_seed(0)
    dtype = torch.bfloat16 if case.adapter else torch.float32  # full FT: fp32 master + bf16 autocast
    quantization = None
    if case.adapter == "qlora":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            return dict(skipped="bitsandbytes is not installed")
        quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=True,
                                                       bnb_4bit_compute_dtype=torch.bfloat16)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa", dtype=dtype)
    if quantization is not None:  # from_config cannot quantise; round-trip through a folder
        import tempfile

        folder = tempfile.mkdtemp()
        model.save_pretrained(folder)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization,
                                                                  attn_implementation="sdpa", dtype=torch.bfloat16)
    if case.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if case.adapter:
        import peft

        if case.adapter == "qlora":
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=case.checkpointing)
        model = peft.get_peft_model(model, peft.LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                                           target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, fused=device == "cuda")
    ids = torch.randint(0, shape["vocab_size"], (case.batch, case.seq), device=device)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    start = time.perf_counter()
    step()
    first_s = time.perf_counter() - start
    step()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    with PowerMeter(nvml=device == "cuda") as power:
        start = time.perf_counter()
        for _ in range(steps):
            loss = step()
        sync()
        seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    return dict(tokens_per_second=steps * case.batch * case.seq / seconds, step_ms=1000 * seconds / steps,
                peak_gib=peak, compile_s=first_s, loss=float(loss), **power.result(steps, steps * case.batch * case.seq))


# ------------------------------------------------------------------------------------- driver
def peak_flops() -> float | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True).stdout.lower()
    except OSError:
        return None
    return 989e12 if ("h100" in out or "h200" in out) else None


def parse_mesh(text: str) -> dict[str, int]:
    """"data=2,tensor=2" → {"data": 2, "tensor": 2}; "1" (or "") → one device."""
    if text in ("", "1"):
        return {}
    sizes = {}
    for part in text.split(","):
        axis, _, size = part.partition("=")
        sizes[axis.strip()] = int(size)
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--sides", nargs="+", default=["jaxtune", "torch"], choices=["jaxtune", "torch"])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test)")
    parser.add_argument("--attention", default="cudnn", choices=["cudnn", "pallas", "xla"],
                        help="jaxtune's attention backend (cudnn: unpacked rows only, as here)")
    parser.add_argument("--meshes", nargs="+", default=["1"],
                        help="jaxtune meshes to run each case on, e.g. 1 data=2 tensor=2 sequence=2; rows after "
                             "the first print scaling efficiency against it (PyTorch runs on one GPU only)")
    parser.add_argument("--seq", type=int, nargs="+", default=None, help="override the cases' sequence length(s)")
    parser.add_argument("--batch", type=int, default=None, help="override the cases' micro-batch (rows per shard)")
    parser.add_argument("--ce", default="fused", choices=["fused", "plain"],
                        help="jaxtune's cross-entropy: gradient in the forward pass (fused) or autodiff with "
                             "recomputed logits (plain)")
    parser.add_argument("--ce-chunk", type=int, default=None,
                        help="jaxtune's cross-entropy tokens per chunk (default: the trainer's, by vocab size)")
    parser.add_argument("--ce-logits", default=None, choices=["float32", "bfloat16"],
                        help="jaxtune's cross-entropy: dtype the lm_head matmul writes its logits in "
                             "(default: the trainer's, the compute dtype as in transformers; the softmax "
                             "math stays float32)")
    parser.add_argument("--remat", default=None, help="jaxtune's remat policy for the checkpointing cases "
                                                        "(default nothing_saveable)")
    parser.add_argument("--scan-unroll", type=int, default=1,
                        help="jaxtune: layers per iteration of the layer loop (the number of layers: unrolled, "
                             "as the trainer's scan_layers: false)")
    parser.add_argument("--gate-up-kernel", choices=("on", "off"), default=None,
                        help="jaxtune: LoRA gate/up projections and the activation in one Hopper kernel (on; "
                             "an error for a case it cannot take) or in XLA (off); default: the trainer's "
                             "(jaxtune/lora_gate_up.py KERNEL: on a Hopper GPU where it fits)")
    parser.add_argument("--gate-up-cluster", type=int, choices=(1, 2), default=None,
                        help="jaxtune: CTAs per cluster of that kernel (2: its kernel tiles multicast to pairs of "
                             "programs); default: jaxtune/lora_gate_up.py CLUSTER")
    parser.add_argument("--joint-gate-up", choices=("on", "off"), default=None,
                        help="jaxtune: LoRA gate/up projections as one matmul over both kernels, chunk by chunk "
                             "(on) or as two projections (off); default: the trainer's (jaxtune/lora.py "
                             "JOINT_GATE_UP, on)")
    parser.add_argument("--gate-up-chunk", type=int, default=None,
                        help="jaxtune: columns per chunk of that matmul (default: jaxtune/lora.py GATE_UP_CHUNK)")
    parser.add_argument("--lora-kernel", choices=("auto", "off"), default=None,
                        help="jaxtune: plain LoRA projections and the residual adds after o_proj and down_proj "
                             "through one Hopper kernel (auto: on a Hopper GPU where it fits) or in XLA (off); "
                             "default: the trainer's (jaxtune/lora_projection.py KERNEL)")
    parser.add_argument("--lora-cluster", type=int, choices=(1, 2), default=None,
                        help="jaxtune: CTAs per cluster of that kernel; default: jaxtune/lora_projection.py CLUSTER")
    parser.add_argument("--lora-cooperative-k", type=int, default=None,
                        help="jaxtune: that kernel's products with K at least this take cooperative 128-row tiles; "
                             "default: jaxtune/lora_projection.py COOPERATIVE_K")
    parser.add_argument("--activation-grad-kernel", choices=("on", "off"), default=None,
                        help="jaxtune: where that kernel runs, down_proj's backward and the gated activation's "
                             "backward in it (on) or cuBLAS and the activation's own kernel (off); default: "
                             "the trainer's (jaxtune/lora_projection.py ACTIVATION_GRAD, on)")
    parser.add_argument("--norm-kernels", choices=("auto", "off"), default=None,
                        help="jaxtune: the residual stream's RMSNorms through our Pallas kernels on a GPU (auto) "
                             "or as XLA's fusions of the plain form (off); default: the trainer's "
                             "(jaxtune/model/norm.py KERNELS, auto)")
    parser.add_argument("--profile", default=None, help="folder: trace 3 more jaxtune steps, print the top kernels "
                        "and what they compute (HLO dumped there; command buffers off for the jaxtune side)")
    parser.add_argument("--profile-graphs", action="store_true",
                        help="with --profile: keep XLA's command buffers (CUDA graphs) on, as in a normal run, so "
                             "that the idle time between kernels is the real one (kernels then do not name their "
                             "HLO instructions)")
    parser.add_argument("--aot", action="store_true",
                        help="jaxtune: only compile each mesh's step from abstract arrays and print its per-device "
                             "memory estimate and collectives (runs on CPU devices too)")
    parser.add_argument("--out", default=None, help="folder for results.jsonl")
    parser.add_argument("--worker", nargs=4, metavar=("SIDE", "CASE", "SEQ", "MESH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    # every knob's flag has the field's name as its dest (`flags` writes them so)
    knobs = JaxtuneKnobs(**{field.name: getattr(args, field.name) for field in dataclasses.fields(JaxtuneKnobs)})

    def resolve(name: str, seq: int | None) -> tuple[Case, dict]:
        case = CASES[name]
        if args.tiny:
            case = dataclasses.replace(case, seq=64, batch=2)
        case = dataclasses.replace(case, seq=seq or case.seq, batch=args.batch or case.batch)
        return case, SHAPES["tiny" if args.tiny else case.shape]

    if args.worker:
        side, name, seq, mesh = args.worker
        if side == "jaxtune":  # the XLA options `python -m jaxtune.train` sets, before jax starts its backend
            from jaxtune.xla_flags import add_gpu_flags

            add_gpu_flags()
        case, shape = resolve(name, int(seq))
        if side == "jaxtune" and args.aot:
            result = compile_ahead_of_time(case, shape, args.steps, parse_mesh(mesh), knobs)
        elif side == "jaxtune":
            result = run_jaxtune(case, shape, args.steps, parse_mesh(mesh), knobs,
                                 args.profile and os.path.join(args.profile, f"{name}-{case.seq}-{mesh}"))
        else:
            result = run_torch(case, shape, args.steps)
        print("RESULT " + json.dumps(result), flush=True)
        return

    peak = peak_flops()
    rows = []
    for name in args.cases:
        for seq in args.seq or [None]:
            case, shape = resolve(name, seq)
            fpt = flops_per_token(shape, case.seq)
            baseline = None  # the first mesh's jaxtune tokens/s per device
            for mesh in args.meshes:
                results = {}
                sides = args.sides if mesh == args.meshes[0] else ["jaxtune"]
                for side in sides:
                    cmd = [sys.executable, __file__, "--worker", side, name, str(case.seq), mesh,
                           "--steps", str(args.steps)] + knobs.flags() + (
                        ["--profile", args.profile] if args.profile else []) + (["--aot"] if args.aot else []) + (
                        ["--tiny"] if args.tiny else []) + (["--batch", str(args.batch)] if args.batch else [])
                    env = dict(os.environ)
                    if args.profile and side == "jaxtune":  # kernels named after their HLO ops, and the HLO
                        hlo_dir = os.path.join(args.profile, f"{name}-{case.seq}-{mesh}", "hlo")
                        graphs = [] if args.profile_graphs else ["--xla_gpu_enable_command_buffer="]
                        env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""), *graphs, f"--xla_dump_to={hlo_dir}",
                                                     "--xla_dump_hlo_module_re=jit_train_step"])
                    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                    print("\n".join(l for l in proc.stdout.splitlines() if l.startswith(("|", "device time"))))
                    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
                    if proc.returncode != 0 or not lines:
                        results[side] = dict(error=(proc.stderr or proc.stdout).strip().splitlines()[-3:])
                    else:
                        results[side] = json.loads(lines[-1][len("RESULT "):])
                    r = results[side]
                    if "tokens_per_second" in r and peak:
                        r["mfu"] = r["tokens_per_second"] * fpt / (peak * r.get("devices", 1))
                    if side == "jaxtune" and "tokens_per_second" in r:
                        per_device = r["tokens_per_second"] / r["devices"]
                        baseline = baseline or per_device
                        r["scaling_efficiency"] = per_device / baseline
                    print(f"{name:14s} seq {case.seq:6d} mesh {mesh:10s} {side:8s} {json.dumps(r)}", flush=True)
                rows.append(dict(case=name, seq=case.seq, mesh=mesh, **results))
                if args.out:
                    os.makedirs(args.out, exist_ok=True)
                    with open(os.path.join(args.out, "results.jsonl"), "a") as f:
                        f.write(json.dumps(rows[-1]) + "\n")

    print("\n| case | seq | mesh | jaxtune tok/s | step ms | scaling eff. | PyTorch tok/s | ratio | jaxtune GiB/GPU "
          "| jaxtune step GiB | PyTorch GiB | jaxtune MFU | compile s | mJ/token (jaxtune / PyTorch) "
          "| SM MHz (jaxtune / PyTorch) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    fmt = lambda v, spec: format(v, spec) if isinstance(v, (int, float)) else "-"
    for row in rows:
        j, t = row.get("jaxtune", {}), row.get("torch", {})
        jt, tt = j.get("tokens_per_second"), t.get("tokens_per_second")
        ratio = f"{jt / tt:.2f}" if jt and tt else "-"
        print(f"| {row['case']} | {row['seq']} | {row['mesh']} | {fmt(jt, ',.0f')} | {fmt(j.get('step_ms'), '.1f')} "
              f"| {fmt(j.get('scaling_efficiency'), '.2f')} | {fmt(tt, ',.0f')} | {ratio} "
              f"| {fmt(j.get('peak_gib'), '.1f')} | {fmt(j.get('step_gib'), '.1f')} | {fmt(t.get('peak_gib'), '.1f')} "
              f"| {fmt(j.get('mfu'), '.1%')} "
              f"| {fmt(j.get('compile_s'), '.1f')} "
              f"| {fmt(j.get('mj_per_token'), '.2f')} / {fmt(t.get('mj_per_token'), '.2f')} "
              f"| {fmt(j.get('sm_clock_mhz'), '.0f')} / {fmt(t.get('sm_clock_mhz'), '.0f')} |")


if __name__ == "__main__":
    main()
