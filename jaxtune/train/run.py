"""The training run: config → data → model → transforms → sharded state → loop → outputs.

Reads straight through; each stage lives in its own module. The loop dispatches step i before
reading step i-1's metrics, so the host never waits on the device except at logging, evaluation
and checkpoint boundaries.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxtune.config import Config, dump_resolved
from jaxtune.config.schema import OPTIMIZERS as OPTIMIZER_RULES
from jaxtune import lora
from jaxtune.converters.hf import save_hf
from jaxtune.converters.peft import export_peft
from jaxtune.errors import CheckpointError, JaxtuneError
from jaxtune.mesh import make_mesh
from jaxtune.model.config import ModelConfig
from jaxtune.model.layer_list import split_layer_shardings, split_layers
from jaxtune.sharding import activation_sharding, merged_rules
from jaxtune.train import distributed
from jaxtune.train.batches import TrainData, prepare_data
from jaxtune.train.checkpoints import Checkpoints, abstract_like
from jaxtune.train.evaluation import make_eval_step, evaluate
from jaxtune.train.optimizer import OptimizerSettings, make_optimizer
from jaxtune.train.model_setup import ModelSetup, build_model
from jaxtune.train.placement import batch_sharding, create_state, state_shardings
from jaxtune.train.reporting import Reporter, summary
from jaxtune.train.state import combine, partition
from jaxtune.train.step import StepSettings, make_train_step
from jaxtune.train.watchdog import LossWatchdog, TrainingStopped


@dataclasses.dataclass
class RunResult:
    steps: int
    final_loss: float | None
    eval_loss: float | None
    outputs: dict[str, str]
    interrupted: bool = False


def compute_dtype(cfg: Config) -> jnp.dtype:
    """bf16: true → bfloat16; false → float32; auto → bfloat16 on GPU, float32 on CPU (slow bf16)."""
    if cfg.bf16 == "auto":
        return jnp.dtype(jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32)
    return jnp.dtype(jnp.bfloat16 if cfg.bf16 else jnp.float32)


def optimizer_settings(cfg: Config, total_steps: int) -> OptimizerSettings:
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(round((cfg.warmup_ratio or 0) * total_steps))
    return OptimizerSettings(
        name=OPTIMIZER_RULES[cfg.optimizer], learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
        beta1=cfg.adam_beta1, beta2=cfg.adam_beta2, epsilon=cfg.adam_epsilon,
        max_grad_norm=cfg.max_grad_norm or None, schedule=cfg.lr_scheduler, warmup_steps=warmup,
        cosine_min_lr_ratio=cfg.cosine_min_lr_ratio)


def every(value, total_steps: int, steps_per_epoch: int, per_epoch: int | None) -> int | None:
    """An interval in steps from `N`, a fraction of the run (< 1), or `per_epoch` times an epoch."""
    if per_epoch:
        return max(1, steps_per_epoch // per_epoch)
    if value is None:
        return None
    return max(1, int(round(value * total_steps))) if value < 1 else int(value)


def export_final(cfg: Config, setup: ModelSetup, state, frozen, out_dir: str) -> dict[str, str]:
    """The run's deliverable: `adapter/` (PEFT) for LoRA/QLoRA, `model/` (HF folder) otherwise."""
    if setup.lora_cfg is not None:
        trainable = state.trainable
        if jax.process_count() > 1:  # adapters may be sharded across hosts: gather (they are small)
            trainable = jax.tree.map(lambda x: multihost_utils.process_allgather(x, tiled=True), trainable)
        folder = os.path.join(out_dir, "adapter")
        if jax.process_index() == 0:
            export_peft(folder, combine(trainable, frozen), setup.model_cfg, setup.lora_cfg,
                        base_model_name_or_path=cfg.base_model)
        return {"adapter": folder}
    params = _export_params(combine(state.trainable, frozen), checkpoint_dtype(setup.hf_config))
    folder = os.path.join(out_dir, "model")
    if jax.process_index() == 0:
        save_hf(folder, setup.model_cfg, params, hf_config=setup.hf_config, tokenizer_dir=cfg.tokenizer_config)
    return {"model": folder}


def train(cfg: Config) -> RunResult:
    distributed.initialize_if_needed()
    mesh = make_mesh(cfg.mesh.sizes)
    rules = merged_rules(cfg.sharding_rules)
    dtype = compute_dtype(cfg)
    out_dir = os.path.abspath(cfg.output_dir)
    if jax.process_index() == 0:
        _check_writable(out_dir)
        dump_resolved(cfg, out_dir)

    data: TrainData = prepare_data(cfg, mesh)
    accum = cfg.gradient_accumulation_steps
    steps_per_epoch = data.steps_per_epoch
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.num_epochs * steps_per_epoch))

    setup = build_model(cfg, mesh, rules, dtype)
    model_cfg = setup.model_cfg
    trainable, frozen = partition(setup.params, setup.mask)
    del setup.params

    tx, schedule = make_optimizer(optimizer_settings(cfg, total_steps), total_steps)
    trainable_sh, frozen_sh = partition(setup.shardings, setup.mask)
    if not cfg.scan_layers:  # unrolled, each layer reads its own frozen arrays: no per-layer copies
        frozen = split_layers(frozen, donate=True)
        frozen_sh = split_layer_shardings(frozen_sh, model_cfg.num_layers)
    state_sh = state_shardings(trainable_sh, tx, jax.eval_shape(lambda t: t, trainable), mesh)
    batch_sh = batch_sharding(mesh, rules)
    state = create_state(trainable, tx, jax.random.key(cfg.seed), state_sh)
    del trainable

    checkpoints = Checkpoints(os.path.join(out_dir, "checkpoints"), keep=cfg.save_total_limit)
    start_step = 0
    resume_dir = cfg.resume_from_checkpoint
    if resume_dir or (cfg.auto_resume_from_checkpoints and checkpoints.latest_step() is not None):
        source = Checkpoints(os.path.dirname(os.path.abspath(resume_dir))) if resume_dir else checkpoints
        step_to_load = int(os.path.basename(os.path.normpath(resume_dir))) if resume_dir else None
        start_step, state, loader_state = source.restore(abstract_like(state), step_to_load)
        data.train.set_state(loader_state)

    settings = StepSettings(dtype=dtype, attention=_attention_backend(cfg, model_cfg, mesh.shape["sequence"]),
                            remat=cfg.remat_policy, scan_unroll=1 if cfg.scan_layers else model_cfg.num_layers,
                            packed=cfg.sample_packing)
    step_fn = make_train_step(model_cfg, tx, schedule, settings,
                              with_rng=lora.with_dropout_keys if setup.lora_cfg is not None else None)
    reporter = Reporter(out_dir, total_steps, start_step=start_step, use_tensorboard=cfg.use_tensorboard,
                        wandb_project=cfg.wandb_project,
                        wandb_kwargs=dict(entity=cfg.wandb_entity, name=cfg.wandb_name), run_config=cfg.to_dict())
    if start_step:
        reporter.message(f"resumed from checkpoint {start_step} in {checkpoints.directory}")
    log_every = cfg.logging_steps or max(1, min(10, total_steps // 200))
    eval_every = every(cfg.eval_steps, total_steps, steps_per_epoch, cfg.evals_per_epoch)
    save_every = every(cfg.save_steps, total_steps, steps_per_epoch, cfg.saves_per_epoch)
    watchdog = LossWatchdog(cfg.loss_watchdog_threshold, cfg.loss_watchdog_patience)

    stop_signal: list[int] = []
    previous_handlers = {s: signal.signal(s, lambda signum, _: stop_signal.append(signum))
                         for s in (signal.SIGTERM, signal.SIGINT)}
    tokens_done, final_loss, eval_loss, interrupted = 0, None, None, False
    run_start = time.perf_counter()
    try:
        with activation_sharding(mesh, rules):
            jitted = jax.jit(step_fn, in_shardings=(state_sh, frozen_sh, batch_sh),
                             out_shardings=(state_sh, None), donate_argnums=(0,))
            eval_step = make_eval_step(model_cfg, settings, state_sh, frozen_sh, batch_sh)
            pending = None  # (step, metrics still on device) of the newest dispatched step
            window_tokens, window_start = 0, time.perf_counter()
            for step in range(start_step + 1, total_steps + 1):
                host_batch = data.train.next_batch()
                batch = data.to_device(host_batch, batch_sh, accum)
                state, metrics = jitted(state, frozen, batch)
                # This process's non-padding tokens; processes hold equal shares of each step's rows.
                tokens = int(np.count_nonzero(host_batch["segment_ids"])) * jax.process_count()
                if pending is not None:
                    final_loss = watchdog.settle(*pending)
                pending = (step, metrics)
                tokens_done += tokens
                window_tokens += tokens
                last = step == total_steps
                if step % log_every == 0 or last:
                    final_loss = watchdog.settle(*pending)
                    elapsed = time.perf_counter() - window_start
                    reporter.log({"step": step, "loss": final_loss, "lr": float(metrics["lr"]),
                                  "grad_norm": float(metrics["grad_norm"]),
                                  "tokens_per_second": window_tokens / max(elapsed, 1e-9),
                                  "epoch": step / steps_per_epoch})
                    window_tokens, window_start = 0, time.perf_counter()
                if data.eval is not None and eval_every and (step % eval_every == 0 or last):
                    eval_loss = evaluate(eval_step, state, frozen, data, batch_sh, accum)
                    reporter.log({"step": step, "eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 50))})
                if (save_every and step % save_every == 0) or last or stop_signal:
                    final_loss = watchdog.settle(*pending)  # never save a state whose loss failed
                    checkpoints.save(step, state, data.train.get_state(), force=True)
                if stop_signal:
                    interrupted = True
                    reporter.message(f"received {signal.Signals(stop_signal[0]).name}: saved checkpoint {step}; "
                                     "run the same command again to resume")
                    break
    except TrainingStopped as stopped:
        checkpoints.wait()
        reporter.close()
        raise JaxtuneError(f"{stopped} Training stopped; the newest good checkpoint is step "
                           f"{checkpoints.latest_step()} in {checkpoints.directory}") from None
    finally:
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)
    seconds = time.perf_counter() - run_start
    checkpoints.close()

    outputs = {"metrics": os.path.join(out_dir, "metrics.jsonl"), "checkpoints": checkpoints.directory}
    if not interrupted:
        outputs.update(export_final(cfg, setup, state, frozen, out_dir))
    reporter.message(summary(steps=int(state.step), tokens=tokens_done, seconds=seconds, final_loss=final_loss,
                             eval_loss=eval_loss, outputs=outputs,
                             flops_per_token=6 * model_cfg.num_params))
    reporter.close()
    return RunResult(steps=int(state.step), final_loss=final_loss, eval_loss=eval_loss, outputs=outputs,
                     interrupted=interrupted)


def checkpoint_dtype(hf_config) -> jnp.dtype:
    """The base checkpoint's dtype (exports keep it), float32 if the config does not say."""
    name = str(getattr(hf_config, "dtype", None) or "float32").removeprefix("torch.")
    return jnp.dtype(name)


def _export_params(params, dtype):
    """Params cast to the export dtype and, on a multi-process run, gathered to every host (the
    gather is collective; only process 0 then writes)."""
    params = jax.tree.map(lambda x: x.astype(dtype), params)
    if jax.process_count() > 1:
        params = jax.tree.map(lambda x: multihost_utils.process_allgather(x, tiled=True), params)
    return params


def _check_writable(out_dir: str) -> None:
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, ".jaxtune-write-test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise CheckpointError(f"output_dir: cannot write to {out_dir}: {e.strerror}") from None


def _attention_backend(cfg: Config, model_cfg: ModelConfig, context_parallel: int) -> str:
    """The attention backend for this run. `mesh.sequence` > 1: ring attention (the data path
    then feeds zigzag-ordered rows, which only it handles). Otherwise `auto` picks our Pallas
    flash kernel on GPU (packed rows, sliding windows) and plain XLA on CPU (Pallas interpret mode
    is for tests). cuDNN is faster for unpacked rows but cannot keep packed sequences apart, so
    it must be asked for and fit."""
    if context_parallel > 1:
        if cfg.attention not in ("auto", "pallas"):
            raise JaxtuneError(f"attention: {cfg.attention} cannot run with mesh.sequence = {context_parallel}; "
                               "context parallelism uses ring attention (attention: auto)")
        return "ring"
    if cfg.attention == "auto":
        return "pallas" if jax.default_backend() == "gpu" else "xla"
    if cfg.attention == "cudnn" and (cfg.sample_packing or model_cfg.has_sliding_window):
        raise JaxtuneError("attention: cudnn cannot mask packed sequences or sliding windows; set "
                           "sample_packing: false (and use a model without sliding windows), or attention: auto")
    return cfg.attention
