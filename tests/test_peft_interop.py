"""PEFT adapters both ways, and merged export, against real PEFT and transformers on tiny random
float32 models. Relative error is max|ours - theirs| / max|theirs| over the logits."""

import json
import os
import shutil

import jax
import numpy as np
import optax
import pytest

import jaxtune
from jaxtune import lora, quant
from jaxtune.converters import peft as jpeft
from jaxtune.errors import ConversionError
from jaxtune.model.transformer import forward
from jaxtune.train.state import combine

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
import tiny_hf  # noqa: E402

pytestmark = pytest.mark.torch
IDS = np.random.default_rng(0).integers(0, tiny_hf.BASE["vocab_size"], size=(2, 11))


def rel_err(ours, ref) -> float:
    return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory):
    """case → folder of the saved tiny HF model (made once per module)."""
    out = {}
    for case in ("llama", "qwen3", "qwen2", "llama-bias"):
        folder = str(tmp_path_factory.mktemp(case))
        tiny_hf.save_model(case, folder)
        out[case] = folder
    return out


def torch_model(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                             attn_implementation="eager").eval()


def train_adapters(params, model_cfg, lora_cfg, steps=4):
    """A few Adam steps on the trainable split (the trainer does the same at scale)."""
    trainable, frozen = lora.split_trainable(params, lora_cfg)
    tx = optax.adam(2e-2)
    opt_state = tx.init(trainable)
    batch = np.random.default_rng(1).integers(0, model_cfg.vocab_size, size=(4, 10))

    @jax.jit
    def step(trainable, opt_state, key):
        def loss(t):
            logits = forward(lora.with_dropout_keys(combine(t, frozen), key), model_cfg, batch[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
        grads = jax.grad(loss)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state

    for i in range(steps):
        trainable, opt_state = step(trainable, opt_state, jax.random.key(i))
    return combine(trainable, frozen)


JAXTUNE_RUNS = {
    "llama-lora-save-embed-head": ("llama", dict(r=4, alpha=8.0, dropout=0.1, target_modules=("q_proj", "v_proj", "down_proj"),
                                                 modules_to_save=("embed_tokens", "lm_head"))),
    "qwen3-rslora-regex": ("qwen3", dict(r=8, alpha=4.0, use_rslora=True,
                                         target_modules=r"model\.layers\.\d+\.(self_attn\.(k|o)_proj|mlp\.up_proj)")),
    "qwen2-tied-all-linear": ("qwen2", dict(r=4, alpha=16.0, target_linear=True)),
    "llama-bias-dora": ("llama-bias", dict(r=4, alpha=8.0, dropout=0.1, target_linear=True, use_dora=True)),
}


@pytest.mark.parametrize("run", sorted(JAXTUNE_RUNS))
def test_jaxtune_trained_adapter_gives_the_same_logits_in_peft(run, base_dirs, tmp_path):
    case, kw = JAXTUNE_RUNS[run]
    model = jaxtune.load_pretrained(base_dirs[case])
    cfg = lora.LoraConfig(**kw)
    params = train_adapters(lora.apply(model.params, cfg, model.config, jax.random.key(0)), model.config, cfg)
    ours = np.asarray(jax.jit(lambda p: forward(p, model.config, IDS))(params))
    adapter = str(tmp_path / "adapter")
    assert jpeft.export_peft(adapter, params, model.config, cfg, base_model_name_or_path=base_dirs[case]) == [
        "adapter_config.json", "adapter_model.safetensors"]
    with open(os.path.join(adapter, "adapter_config.json")) as f:
        written = json.load(f)
    assert written["peft_type"] == "LORA" and written["task_type"] == "CAUSAL_LM"
    assert (written["r"], written["lora_alpha"], written["use_rslora"], written["use_dora"]) == (
        cfg.r, cfg.alpha, cfg.use_rslora, cfg.use_dora)
    assert written["modules_to_save"] == (list(cfg.modules_to_save) or None)
    assert written["base_model_name_or_path"] == base_dirs[case]

    theirs = tiny_hf.torch_logits(peft.PeftModel.from_pretrained(torch_model(base_dirs[case]), adapter).eval(), IDS)
    assert rel_err(ours, theirs) <= 1e-5, rel_err(ours, theirs)
    base = tiny_hf.torch_logits(torch_model(base_dirs[case]), IDS)
    assert rel_err(base, theirs) > 1e-3  # the trained adapter changes the model
    # and back: the exported adapter loads into jaxtune unchanged
    again = jaxtune.load_pretrained(base_dirs[case], adapter=adapter)
    assert again.adapter_config.scale == cfg.scale
    np.testing.assert_array_equal(again(IDS), ours)


PEFT_ADAPTERS = {
    "llama-list-save-head": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "gate_proj"],
                                           modules_to_save=["lm_head"])),
    "qwen3-regex-rslora": ("qwen3", dict(r=6, lora_alpha=12, use_rslora=True,
                                         target_modules=r".*\.(v_proj|down_proj)")),
    "llama-all-linear-dora": ("llama", dict(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True)),
}


def make_peft_adapter(folder, adapter_dir, kw, seed=0):
    """A PEFT adapter with every LoRA tensor (and saved module) random, so nothing is an identity."""
    model = peft.get_peft_model(torch_model(folder), peft.LoraConfig(task_type="CAUSAL_LM", **kw))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name or "modules_to_save" in name:
                p.add_(0.05 * torch.randn_like(p))  # stay near the base's norms / weights
            elif "lora_A" in name or "lora_B" in name:
                p.copy_(0.2 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(adapter_dir)
    return model


@pytest.mark.parametrize("name", sorted(PEFT_ADAPTERS))
def test_peft_adapter_gives_the_same_logits_in_jaxtune_and_merged(name, base_dirs, tmp_path):
    case, kw = PEFT_ADAPTERS[name]
    adapter = str(tmp_path / "adapter")
    peft_model = make_peft_adapter(base_dirs[case], adapter, kw)
    theirs = tiny_hf.torch_logits(peft_model, IDS)
    model = jaxtune.load_pretrained(base_dirs[case], adapter=adapter)
    assert rel_err(model(IDS), theirs) <= 1e-5, rel_err(model(IDS), theirs)
    # PEFT's own target matching picked the same modules ours does
    wrapped = {n.rpartition(".")[2] for n, m in peft_model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    all_linear = kw["target_modules"] == "all-linear"
    ours = lora.LoraConfig(r=kw["r"], target_linear=all_linear, target_modules=() if all_linear else kw["target_modules"],
                           modules_to_save=tuple(kw.get("modules_to_save", ())))
    assert wrapped == {p[-2] for p in lora.target_paths(ours, model.config)}
    # merged export: an HF folder transformers loads, same logits, same weights as PEFT's merge
    merged_dir = str(tmp_path / "merged")
    model.save(merged_dir)
    merged = torch_model(merged_dir)
    assert rel_err(tiny_hf.torch_logits(merged, IDS), theirs) <= 1e-5
    peft_merged = peft_model.merge_and_unload().state_dict()
    for key, value in merged.state_dict().items():
        np.testing.assert_allclose(value.numpy(), peft_merged[key].numpy(), rtol=1e-5, atol=1e-6, err_msg=key)


def test_modules_to_save_round_trip_bit_for_bit(base_dirs, tmp_path):
    first, second = str(tmp_path / "peft"), str(tmp_path / "jaxtune")
    make_peft_adapter(base_dirs["llama"], first, dict(r=4, lora_alpha=8, target_modules=["k_proj", "up_proj"],
                                                      modules_to_save=["embed_tokens", "lm_head"]))
    model = jaxtune.load_pretrained(base_dirs["llama"], adapter=first)
    assert model.adapter_config.modules_to_save == ("embed_tokens", "lm_head")
    jpeft.export_peft(second, model.params, model.config, model.adapter_config)
    from safetensors.numpy import load_file
    theirs, ours = load_file(os.path.join(first, "adapter_model.safetensors")), load_file(
        os.path.join(second, "adapter_model.safetensors"))
    assert sorted(theirs) == sorted(ours)
    assert "base_model.model.model.embed_tokens.weight" in ours and "base_model.model.lm_head.weight" in ours
    for key in theirs:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


def test_qlora_merged_export_dequantises_and_says_so(base_dirs, tmp_path):
    model = jaxtune.load_pretrained(base_dirs["llama"])
    cfg = lora.LoraConfig(r=4, alpha=8.0, target_linear=True)
    params = quant.quantize(model.params, model.config, quant.QuantConfig(bits=4))
    params = train_adapters(lora.apply(params, cfg, model.config, jax.random.key(0)), model.config, cfg)
    ours = np.asarray(jax.jit(lambda p: forward(p, model.config, IDS))(params))
    out = str(tmp_path / "merged")
    written = jpeft.export_merged(out, params, model.config, hf_config=model.hf_config)
    assert "README.md" in written and "Quantising this model again" in open(os.path.join(out, "README.md")).read()
    assert rel_err(tiny_hf.torch_logits(torch_model(out), IDS), ours) <= 1e-5
    # the adapter alone on the float32 base (PEFT) is not the QLoRA model: the NF4 rounding is part of it
    jpeft.export_peft(str(tmp_path / "adapter"), params, model.config, cfg)
    on_dense = tiny_hf.torch_logits(peft.PeftModel.from_pretrained(torch_model(base_dirs["llama"]),
                                                                   str(tmp_path / "adapter")), IDS)
    assert rel_err(on_dense, ours) > 1e-3


# --- bad input ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_adapter(base_dirs, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("adapter"))
    make_peft_adapter(base_dirs["llama"], folder, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    return folder


def _edited_adapter(good, tmp_path, config_edit=None, drop=None, rename=None):
    folder = str(tmp_path / "edited")
    shutil.copytree(good, folder)
    if config_edit:
        path = os.path.join(folder, "adapter_config.json")
        with open(path) as f:
            config = json.load(f)
        config.update(config_edit)
        with open(path, "w") as f:
            json.dump(config, f)
    if drop or rename:
        from safetensors.numpy import load_file, save_file
        path = os.path.join(folder, "adapter_model.safetensors")
        tensors = load_file(path)
        tensors = {(rename(k) if rename else k): v for k, v in tensors.items() if not (drop and drop in k)}
        save_file(tensors, path, metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("problem, message", [
    ("model folder", "no adapter_config.json .* looks like a model folder"),
    ("missing folder", "adapter folder .* does not exist"),
    ("other model", r"lora_A.weight in .*adapter_model.safetensors has shape \(4, 24\); the base model needs \(4, 64\)"),
    ("missing layer", r"base_model.model.model.layers.\*.self_attn.q_proj has lora_A for layers \[0, 2\] but not \[1\]"),
    ("fan_in_fan_out", r"fan_in_fan_out=True .* is not supported"),
    ("prefix tuning", "peft_type is 'PREFIX_TUNING'"),
    ("lora on a norm", "adapts model.norm, which is not a decoder-layer projection"),
])
def test_bad_adapters_raise_one_clear_error(problem, message, base_dirs, good_adapter, tmp_path):
    folder = {
        "model folder": lambda: base_dirs["llama"],
        "missing folder": lambda: str(tmp_path / "nope"),
        "other model": lambda: _other_model_adapter(tmp_path),
        "missing layer": lambda: _edited_adapter(good_adapter, tmp_path, drop="layers.1.self_attn.q_proj"),
        "fan_in_fan_out": lambda: _edited_adapter(good_adapter, tmp_path, config_edit={"fan_in_fan_out": True}),
        "prefix tuning": lambda: _edited_adapter(good_adapter, tmp_path, config_edit={"peft_type": "PREFIX_TUNING"}),
        "lora on a norm": lambda: _edited_adapter(good_adapter, tmp_path, rename=lambda k: k.replace(
            "model.layers.0.self_attn.q_proj", "model.norm")),
    }[problem]()
    with pytest.raises(ConversionError, match=message):
        jaxtune.load_pretrained(base_dirs["llama"], adapter=folder)


def _other_model_adapter(tmp_path):
    """A PEFT adapter for a model with hidden_size 24 (the tests' base has 64)."""
    cfg = transformers.LlamaConfig(**{**tiny_hf.BASE, "hidden_size": 24, "num_attention_heads": 2,
                                      "num_key_value_heads": 1, "head_dim": 12})
    model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_config(cfg),
                                peft.LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    folder = str(tmp_path / "other")
    model.save_pretrained(folder)
    return folder
