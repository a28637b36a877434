"""Training throughput: jaxtune vs transformers + PEFT on the same GPU, same shapes, same run.

    python benchmarks/train_throughput.py --cases 1b-lora 1b-full [--steps 10] [--out DIR]

Each side runs in its own process (both frameworks want the whole GPU), on identical
random-weight Llama-shaped models and random token batches: bf16 compute, AdamW (fused on the
PyTorch side), LoRA r=16 α=32 on every linear layer, dropout 0, SDPA/cuDNN attention. Prints
tokens/s, peak device memory, MFU, compile/first-step time and the jaxtune/PyTorch ratio.
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
    "8b-lora-ckpt": Case("8b", 4096, 1, "lora", True),
    "8b-qlora-ckpt": Case("8b", 4096, 1, "qlora", True),
}
LORA_R, LORA_ALPHA = 16, 32
LR = 1e-4


def flops_per_token(shape: dict, seq: int) -> float:
    """Model FLOPs per trained token: 6·N for the matmuls plus causal attention (fwd + bwd)."""
    d, f, L, v = shape["hidden_size"], shape["intermediate_size"], shape["num_layers"], shape["vocab_size"]
    q, kv = shape["num_heads"] * shape["head_dim"], shape["num_kv_heads"] * shape["head_dim"]
    n = L * (d * (2 * q + 2 * kv) + 3 * d * f) + d * v
    attention = L * 6 * seq * q  # 2·2·S·q per token forward, halved by causality, ×3 with backward
    return 6 * n + attention


# ------------------------------------------------------------------------------------- jaxtune
def run_jaxtune(case: Case, shape: dict, steps: int, attention: str = "cudnn") -> dict:
    import jax
    import jax.numpy as jnp

    from jaxtune import lora, quant
    from jaxtune.model.config import ModelConfig
    from jaxtune.model.params import init_params
    from jaxtune.train.optimizer import OptimizerSettings, make_optimizer
    from jaxtune.train.state import init_state, partition
    from jaxtune.train.step import StepSettings, make_train_step

    cfg = ModelConfig(family="llama", **shape)
    on_gpu = jax.default_backend() == "gpu"
    base_dtype = jnp.bfloat16 if case.adapter else jnp.float32
    params = jax.jit(lambda k: init_params(cfg, k, dtype=base_dtype))(jax.random.key(0))
    if case.adapter == "qlora":
        params = quant.quantize(params, cfg, quant.QuantConfig(bits=4, double_quant=True))
    if case.adapter:
        lcfg = lora.LoraConfig(r=LORA_R, alpha=LORA_ALPHA, target_linear=True)
        params = lora.apply(params, lcfg, cfg, jax.random.key(1))
        mask = lora.trainable_mask(params)
    else:
        mask = jax.tree.map(lambda _: True, params)
    trainable, frozen = partition(params, mask)
    del params
    frozen_bytes = sum(x.nbytes for x in jax.tree.leaves(frozen))
    tx, schedule = make_optimizer(OptimizerSettings(learning_rate=LR, max_grad_norm=1.0, schedule="constant"), steps)
    state = jax.jit(lambda t: init_state(t, tx, jax.random.key(2)))(trainable)
    del trainable
    settings = StepSettings(dtype=jnp.bfloat16, attention=attention if on_gpu else "xla",
                            remat="nothing_saveable" if case.checkpointing else None)
    step = jax.jit(make_train_step(cfg, tx, schedule, settings), donate_argnums=(0,))
    rng = jax.random.key(3)
    ids = jax.random.randint(rng, (1, case.batch, case.seq), 0, shape["vocab_size"], jnp.int32)
    batch = dict(input_ids=ids, labels=ids, segment_ids=jnp.ones_like(ids),
                 positions=jnp.broadcast_to(jnp.arange(case.seq, dtype=jnp.int32), ids.shape))
    start = time.perf_counter()
    compiled = step.lower(state, frozen, batch).compile()
    compile_s = time.perf_counter() - start
    for _ in range(2):  # warm-up
        state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready(metrics)
    seconds = time.perf_counter() - start
    stats = jax.devices()[0].memory_stats() or {}
    return dict(tokens_per_second=steps * case.batch * case.seq / seconds, step_ms=1000 * seconds / steps,
                peak_gib=stats.get("peak_bytes_in_use", 0) / 2**30, compile_s=compile_s,
                loss=float(metrics["loss"]), frozen_gib=frozen_bytes / 2**30,
                frozen_bytes_per_param=frozen_bytes / ModelConfig(family="llama", **shape).num_params)


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
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    return dict(tokens_per_second=steps * case.batch * case.seq / seconds, step_ms=1000 * seconds / steps,
                peak_gib=peak, compile_s=first_s, loss=float(loss))


# ------------------------------------------------------------------------------------- driver
def peak_flops() -> float | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True).stdout.lower()
    except OSError:
        return None
    return 989e12 if ("h100" in out or "h200" in out) else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--sides", nargs="+", default=["jaxtune", "torch"], choices=["jaxtune", "torch"])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test)")
    parser.add_argument("--attention", default="cudnn", choices=["cudnn", "pallas", "xla"],
                        help="jaxtune's attention backend (cudnn: unpacked rows only, as here)")
    parser.add_argument("--out", default=None, help="folder for results.jsonl")
    parser.add_argument("--worker", nargs=2, metavar=("SIDE", "CASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        side, name = args.worker
        case = CASES[name]
        if args.tiny:
            case = dataclasses.replace(case, seq=64, batch=2)
        shape = SHAPES["tiny" if args.tiny else case.shape]
        if side == "jaxtune":
            result = run_jaxtune(case, shape, args.steps, args.attention)
        else:
            result = run_torch(case, shape, args.steps)
        print("RESULT " + json.dumps(result), flush=True)
        return

    peak = peak_flops()
    rows = []
    for name in args.cases:
        case = CASES[name]
        seq = 64 if args.tiny else case.seq
        fpt = flops_per_token(SHAPES["tiny" if args.tiny else case.shape], seq)
        results = {}
        for side in args.sides:
            cmd = [sys.executable, __file__, "--worker", side, name, "--steps", str(args.steps),
                   "--attention", args.attention] + (["--tiny"] if args.tiny else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                results[side] = dict(error=(proc.stderr or proc.stdout).strip().splitlines()[-1:])
            else:
                results[side] = json.loads(lines[-1][len("RESULT "):])
            r = results[side]
            if "tokens_per_second" in r and peak:
                r["mfu"] = r["tokens_per_second"] * fpt / peak
            print(f"{name:14s} {side:8s} {json.dumps(r)}", flush=True)
        rows.append(dict(case=name, **{side: r for side, r in results.items()}))
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "results.jsonl"), "a") as f:
                f.write(json.dumps(rows[-1]) + "\n")

    print("\n| case | jaxtune tok/s | PyTorch tok/s | ratio | jaxtune GiB | PyTorch GiB | jaxtune MFU | compile s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        j, t = row.get("jaxtune", {}), row.get("torch", {})
        jt, tt = j.get("tokens_per_second"), t.get("tokens_per_second")
        ratio = f"{jt / tt:.2f}" if jt and tt else "-"
        fmt = lambda v, spec: format(v, spec) if isinstance(v, (int, float)) else "-"
        print(f"| {row['case']} | {fmt(jt, ',.0f')} | {fmt(tt, ',.0f')} | {ratio} | {fmt(j.get('peak_gib'), '.1f')} "
              f"| {fmt(t.get('peak_gib'), '.1f')} | {fmt(j.get('mfu'), '.1%')} | {fmt(j.get('compile_s'), '.1f')} |")


if __name__ == "__main__":
    main()
