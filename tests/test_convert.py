"""HF <-> Megatron conversion: bit-exact round trips, the mapping's layouts, and bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_gopd.convert import mapping
from megatron_gopd.models.arch import ArchError, ModelArch
from megatron_gopd.testing import make_tiny_hf_model, run_distributed, tiny_hf_config

REPO = Path(__file__).resolve().parents[1]


def _round_trip(hf_dir, mc_dir, back_dir, dtype_name):
    from megatron_gopd.convert.checkpoint import convert_hf_to_megatron, convert_megatron_to_hf

    convert_hf_to_megatron(hf_dir, mc_dir)
    convert_megatron_to_hf(mc_dir, back_dir)


@pytest.mark.parametrize(
    "family,tied,dtype",
    [
        ("qwen3", False, torch.bfloat16),
        ("qwen2", True, torch.float32),
        ("llama3", False, torch.float32),
    ],
)
def test_round_trip_is_bit_exact(tmp_path, family, tied, dtype):
    make_tiny_hf_model(tmp_path / "hf", family, tied=tied, dtype=dtype)
    run_distributed(_round_trip, 1, tmp_path / "hf", tmp_path / "mc", tmp_path / "back", str(dtype))
    a = load_file(tmp_path / "hf" / "model.safetensors")
    b = load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype == dtype, k
        assert torch.equal(a[k], b[k]), k
    # the exported directory loads in transformers and gives the same logits
    from transformers import AutoModelForCausalLM

    m1 = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 33]])
    assert torch.equal(m1(ids).logits, m2(ids).logits)
    meta = json.loads((tmp_path / "mc" / "gopd_model.json").read_text())
    assert meta["arch"]["family"] == family.removesuffix("3") if family == "llama3" else family


def test_sharded_export_writes_an_index(tmp_path):
    from megatron_gopd.convert.hf_io import HFWeights, write_hf_checkpoint

    state = {f"w{i}": torch.full((256,), float(i)) for i in range(5)}
    write_hf_checkpoint(tmp_path / "out", state, {"architectures": ["X"]}, max_shard_bytes=2048)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3  # 1 KiB per tensor, 2 KiB per shard
    back = HFWeights(tmp_path / "out")
    assert all(torch.equal(back[k], v) for k, v in state.items())


# ---------------------------------------------------------------------------------- layouts


def test_qkv_fuse_matches_hand_built_grouped_layout():
    """2 kv groups, 2 query heads per group, head_dim 1: rows are [q0 q1 k0 v0 | q2 q3 k1 v1]."""
    arch = ModelArch.from_hf_config(
        tiny_hf_config(
            "qwen3", hidden_size=4, num_attention_heads=4, num_key_value_heads=2, head_dim=1
        ).to_dict()
    )
    q = torch.tensor([[10.0], [11.0], [12.0], [13.0]])
    k = torch.tensor([[20.0], [21.0]])
    v = torch.tensor([[30.0], [31.0]])
    fused = mapping.fuse_qkv(arch, q, k, v)
    assert fused.flatten().tolist() == [10, 11, 20, 30, 12, 13, 21, 31]
    q2, k2, v2 = mapping.split_qkv(arch, fused)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)
    # one TP shard (of 2) holds one group: splitting it gives that group's heads
    qs, ks, vs = mapping.split_qkv(arch, fused[:4], num_groups=1)
    assert qs.flatten().tolist() == [10, 11] and ks.item() == 20 and vs.item() == 30


def test_merge_tp_shards_deinterleaves_gate_up():
    gate, up = torch.arange(4.0).view(4, 1), 100 + torch.arange(4.0).view(4, 1)
    full = torch.cat([gate, up])
    # what each of 2 TP ranks holds: [gate_r; up_r]
    shards = [torch.cat([gate[:2], up[:2]]), torch.cat([gate[2:], up[2:]])]
    merged = mapping.merge_tp_shards("decoder.layers.0.mlp.linear_fc1.weight", shards)
    assert torch.equal(merged, full)
    row = [torch.ones(2, 3), 2 * torch.ones(2, 3)]
    assert mapping.merge_tp_shards("decoder.layers.3.mlp.linear_fc2.weight", row).shape == (2, 6)
    norm = [torch.ones(3), torch.ones(3)]
    assert mapping.merge_tp_shards("decoder.layers.3.input_layernorm.weight", norm).shape == (3,)


def test_te_names_map_like_local_names():
    assert mapping.canonical_name(
        "module.decoder.layers.2.self_attention.linear_qkv.layer_norm_weight"
    ) == ("decoder.layers.2.input_layernorm.weight")
    assert mapping.canonical_name("decoder.layers.0.mlp.linear_fc1.layer_norm_weight") == (
        "decoder.layers.0.pre_mlp_layernorm.weight"
    )


# ---------------------------------------------------------------------------------- architecture


def test_arch_reads_both_rope_spellings():
    v5 = tiny_hf_config("llama3").to_dict()  # transformers 5.x: rope_parameters
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
    v4["rope_theta"] = 500000.0
    v4["rope_scaling"] = {
        "type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    a5, a4 = ModelArch.from_hf_config(v5), ModelArch.from_hf_config(v4)
    assert a5 == a4
    assert a5.rope_theta == 500000.0 and a5.rope_scaling["factor"] == 8.0


def test_llama3_inv_freq_matches_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from megatron_gopd.models.arch import llama3_inv_freq

    cfg = tiny_hf_config("llama3")
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    arch = ModelArch.from_hf_config(cfg.to_dict())
    ours = llama3_inv_freq(arch.head_dim, arch.rope_theta, arch.rope_scaling)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "change,message",
    [
        (
            {"architectures": ["MistralForCausalLM"], "model_type": "mistral"},
            "unsupported architecture",
        ),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"attention_bias": True}, "attention_bias"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "yarn"),
        ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
    ],
)
def test_arch_refuses_what_it_cannot_build(change, message):
    cfg = tiny_hf_config("qwen3").to_dict()
    cfg["architectures"] = ["Qwen3ForCausalLM"]
    cfg.update(change)
    with pytest.raises(ArchError, match=message):
        ModelArch.from_hf_config(cfg)


def test_check_parallel_names_the_field():
    arch = ModelArch.from_hf_config(tiny_hf_config("qwen3", num_key_value_heads=1).to_dict())
    with pytest.raises(ArchError, match="num_key_value_heads=1"):
        arch.check_parallel(2, 1)
    with pytest.raises(ArchError, match="not divisible by PP=3"):
        arch.check_parallel(1, 3)


# ---------------------------------------------------------------------------------- tool CLIs


def _tool(name, *args):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / name), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def _assert_one_line_error(proc, needle):
    assert proc.returncode != 0
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and needle in err[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hfsrc") / "hf"
    make_tiny_hf_model(d, "qwen3")
    return d


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_tool_rejects_unknown_architecture(tmp_path, hf_dir):
    bad = _copy(hf_dir, tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (bad / "config.json").write_text(json.dumps(cfg))
    proc = _tool("convert_hf_to_megatron.py", "--hf-dir", bad, "--out", tmp_path / "out")
    _assert_one_line_error(proc, "unsupported architecture")
    assert not (tmp_path / "out").exists()


def test_tool_rejects_missing_shard(tmp_path, hf_dir):
    bad = _copy(hf_dir, tmp_path / "bad")
    st = load_file(bad / "model.safetensors")
    from megatron_gopd.convert.hf_io import write_hf_checkpoint

    (bad / "model.safetensors").unlink()
    write_hf_checkpoint(
        bad, st, json.loads((bad / "config.json").read_text()), max_shard_bytes=200_000
    )
    shards = sorted(bad.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    proc = _tool("convert_hf_to_megatron.py", "--hf-dir", bad, "--out", tmp_path / "out")
    _assert_one_line_error(proc, "missing")
    assert not (tmp_path / "out").exists()


def test_tool_rejects_mismatched_shapes(tmp_path, hf_dir):
    bad = _copy(hf_dir, tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 128  # the weights say 96
    (bad / "config.json").write_text(json.dumps(cfg))
    proc = _tool("convert_hf_to_megatron.py", "--hf-dir", bad, "--out", tmp_path / "out")
    _assert_one_line_error(proc, "do not match the config")
    assert not (tmp_path / "out").exists()


def test_tool_rejects_a_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    proc = _tool(
        "convert_megatron_to_hf.py", "--load", tmp_path / "junk", "--out", tmp_path / "out"
    )
    _assert_one_line_error(proc, "not a megatron_gopd checkpoint")
    proc = _tool(
        "convert_hf_to_megatron.py", "--hf-dir", tmp_path / "junk", "--out", tmp_path / "out"
    )
    _assert_one_line_error(proc, "no config.json")
    assert not (tmp_path / "out").exists()


def test_tool_refuses_to_overwrite(tmp_path, hf_dir):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    proc = _tool("convert_hf_to_megatron.py", "--hf-dir", hf_dir, "--out", tmp_path / "out")
    _assert_one_line_error(proc, "already exists")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_tool_converts_and_exports(tmp_path, hf_dir):
    proc = _tool("convert_hf_to_megatron.py", "--hf-dir", hf_dir, "--out", tmp_path / "mc")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Qwen3ForCausalLM" in proc.stdout
    proc = _tool("convert_megatron_to_hf.py", "--load", tmp_path / "mc", "--out", tmp_path / "hf")
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = load_file(hf_dir / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list(tmp_path.glob(".*tmp*")), "temporary directories left behind"
