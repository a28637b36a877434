"""HF ⇄ jaxtune conversion: bit-exact round trips, sharded files, and every bad input named."""

import json
import os

import numpy as np
import pytest

import jaxtune
from jaxtune.converters.hf import load_hf_config, save_hf
from jaxtune.converters.safetensors_io import checkpoint_tensors, read_header, write_checkpoint
from jaxtune.errors import ConversionError

torch = pytest.importorskip("torch")
import safetensors.torch  # noqa: E402
import tiny_hf  # noqa: E402
import transformers  # noqa: E402


def hf_tensors(folder) -> dict:
    out = {}
    for file in {ref.file for ref in checkpoint_tensors(str(folder)).values()}:
        out.update(safetensors.torch.load_file(file))
    return out


@pytest.mark.parametrize("case,dtype", [("llama", None), ("qwen2", None), ("qwen3-bias-yarn", None),
                                        ("mistral-window", "bfloat16")])
def test_round_trip_is_bit_exact(case, dtype, tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    model = tiny_hf.make_model(case)
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    model.save_pretrained(src)
    loaded = jaxtune.load_pretrained(str(src), dtype=None)
    loaded.save(str(out))
    before, after = hf_tensors(src), hf_tensors(out)
    assert sorted(before) == sorted(after)
    for name, t in before.items():
        assert t.dtype == after[name].dtype and t.shape == after[name].shape, name
        assert torch.equal(t.view(torch.uint8) if t.dtype == torch.bfloat16 else t,
                           after[name].view(torch.uint8) if t.dtype == torch.bfloat16 else after[name]), name
    assert json.load(open(out / "config.json"))["model_type"] == json.load(open(src / "config.json"))["model_type"]
    assert (out / "generation_config.json").exists()


def test_export_from_scratch_loads_in_transformers_with_same_logits(tmp_path):
    # A config built by jaxtune (no HF config to copy), several shards, tokenizer files copied.
    import jax
    from jaxtune.converters.families import family
    from jaxtune.model.params import init_params

    cfg, _ = load_hf_config(_saved(tmp_path / "ref", "qwen3"))
    params = init_params(cfg, jax.random.key(3))
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer_config.json").write_text("{}")
    written = save_hf(str(tmp_path / "out"), cfg, params, tokenizer_dir=str(tmp_path / "tok"), shard_limit=40_000)
    assert len(written) > 1 and (tmp_path / "out" / "model.safetensors.index.json").exists()
    assert (tmp_path / "out" / "tokenizer_config.json").exists()
    assert family("qwen3").model_config(transformers.AutoConfig.from_pretrained(tmp_path / "out")) == cfg
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    ids = np.arange(11)[None] % cfg.vocab_size
    ours = np.asarray(jaxtune.load_pretrained(str(tmp_path / "out"))(ids))
    np.testing.assert_allclose(ours, tiny_hf.torch_logits(hf_model.float(), ids), rtol=1e-4, atol=1e-5)


def test_sharded_checkpoint_with_index_loads(tmp_path):
    src = _saved(tmp_path / "src", "llama")
    whole = jaxtune.load_pretrained(src)
    model = tiny_hf.make_model("llama")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    sharded = jaxtune.load_pretrained(str(tmp_path / "sharded"))
    ids = np.arange(9)[None]
    np.testing.assert_array_equal(np.asarray(whole(ids)), np.asarray(sharded(ids)))


def _saved(folder, case) -> str:
    tiny_hf.save_model(case, folder)
    return str(folder)


def _rewrite(folder, drop=(), add=None, reshape=None):
    """Rewrite model.safetensors without/with/with-reshaped tensors."""
    path = os.path.join(folder, "model.safetensors")
    tensors = {name: ref.load().copy() for name, ref in read_header(path).items()}
    for name in drop:
        del tensors[name]
    tensors.update(add or {})
    for name, shape in (reshape or {}).items():
        tensors[name] = np.zeros(shape, tensors[name].dtype)
    os.remove(path)
    names = sorted(tensors)
    write_checkpoint(folder, [(n, tensors[n].shape, tensors[n].dtype) for n in names], (tensors[n] for n in names))


def test_missing_tensor_is_named(tmp_path):
    folder = _saved(tmp_path, "llama")
    _rewrite(folder, drop=["model.layers.1.mlp.up_proj.weight"])
    with pytest.raises(ConversionError, match=r"missing 1 tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        jaxtune.load_pretrained(folder)


def test_extra_tensor_is_named_with_its_file(tmp_path):
    folder = _saved(tmp_path, "llama")
    _rewrite(folder, add={"model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)})
    with pytest.raises(ConversionError, match=r"q_proj\.bias \(in model\.safetensors\)"):
        jaxtune.load_pretrained(folder)


def test_misshaped_tensor_is_named_with_both_shapes(tmp_path):
    folder = _saved(tmp_path, "qwen2")
    _rewrite(folder, reshape={"model.layers.2.self_attn.k_proj.weight": (16, 64)})
    with pytest.raises(ConversionError, match=r"k_proj\.weight in .*model\.safetensors has shape \(16, 64\).*\(32, 64\)"):
        jaxtune.load_pretrained(folder)


def test_inv_freq_buffers_of_old_checkpoints_are_ignored(tmp_path):
    folder = _saved(tmp_path, "llama")
    _rewrite(folder, add={"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)})
    jaxtune.load_pretrained(folder)


def test_pickle_checkpoint_is_refused_with_how_to_convert(tmp_path):
    folder = _saved(tmp_path, "llama")
    os.remove(os.path.join(folder, "model.safetensors"))
    open(os.path.join(folder, "pytorch_model.bin"), "wb").write(b"\x80\x04")
    with pytest.raises(ConversionError, match=r"pickle.*pytorch_model\.bin.*safe_serialization=True"):
        jaxtune.load_pretrained(folder)


def test_unknown_model_type_names_the_supported_ones(tmp_path):
    folder = _saved(tmp_path, "llama")
    cfg = json.load(open(os.path.join(folder, "config.json")))
    cfg.update(model_type="gpt2", auto_map={"AutoModelForCausalLM": "modeling.MyModel"})
    json.dump(cfg, open(os.path.join(folder, "config.json"), "w"))
    with pytest.raises(ConversionError, match=r"model_type 'gpt2' is not supported; supported: llama, mistral, qwen2, qwen3"):
        jaxtune.load_pretrained(folder)


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(ConversionError, match="does not exist"):
        jaxtune.load_pretrained(str(tmp_path / "nope"))
    with pytest.raises(ConversionError, match="no config.json"):
        jaxtune.load_pretrained(str(tmp_path))


def test_tied_checkpoint_with_differing_lm_head_is_refused(tmp_path):
    folder = _saved(tmp_path, "qwen2")  # tied
    _rewrite(folder, add={"lm_head.weight": np.ones((97, 64), np.float32)})
    with pytest.raises(ConversionError, match="tie_word_embeddings.*lm_head.weight"):
        jaxtune.load_pretrained(folder)


def test_index_pointing_at_missing_shard(tmp_path):
    tiny_hf.make_model("llama").save_pretrained(tmp_path, max_shard_size="40KB")
    shard = sorted(f for f in os.listdir(tmp_path) if f.startswith("model-"))[0]
    os.remove(tmp_path / shard)
    with pytest.raises(ConversionError, match=f"lists shard {shard}, which is missing"):
        jaxtune.load_pretrained(str(tmp_path))
