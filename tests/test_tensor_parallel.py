"""Tensor-parallel rollouts (rollout.tensor_parallel): torchrun with 4 ranks (gloo, DTensor), as
one group of 4 and as two of 2, decode what one process decodes, no rank holds more than its shards,
and the planner counts those shards exactly. (A 2-rank training run with TP equals one process:
tests/test_throughput.py.)"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, overrides, save_hf_model, subprocess_env
from pbrl.config import load_config
from pbrl.memory import model_args, tensor_parallel_bytes
from pbrl.prepare import check_checkpoints, prepare

SHARDED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
           "embed_tokens", "lm_head")


def test_tensor_parallel_decoding_equals_one_process(tmp_path):
    """4 ranks (gloo): each decodes alone (its whole model), then all 4 as one group on the twin
    refreshed from the FSDP-sharded model: the same greedy and sampled tokens, log-probs to fp32
    rounding; then 2 groups of 2 (dp x tp = 2 x 2), each decoding its members' different prompts
    together, eagerly and compiled (aot_eager, fullgraph): each rank's own tokens, and the
    evaluation records the whole model gives on the group's share of problems. Every TP-4
    weight is 1/4 of the whole (norms whole), the refresh gathers no tensor larger than the largest
    weight, the shards are freed after a rollout (kept when asked), and their bytes are the
    planner's. (TP-2 on 2 ranks through train.py: tests/test_throughput.py.)"""
    ranks = 4
    save_hf_model(tmp_path / "m", "qwen3", num_attention_heads=8, num_key_value_heads=4,
                  tie_word_embeddings=True)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run",
                           f"--nproc_per_node={ranks}", "--standalone",
                           str(Path(ROOT) / "tests" / "scripts" / "tp_decode.py"),
                           str(tmp_path / "m"), str(tmp_path / "report.json")], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    for key in ("greedy", "sampled"):
        assert report[key]["together"] == report[key]["alone"]
        assert report[key]["logprob_gap"] < 1e-5
    assert report["again"] == report["sampled"]["alone"]
    assert report["groups_of_two"] == [True] * ranks
    assert report["kept"] and report["freed"]
    assert report["largest_gathered"] <= report["largest_parameter"]
    for name, (local, whole) in report["shards"].items():
        sharded = any(part in name for part in SHARDED)
        assert local == (whole // ranks if sharded else whole), name
    args = model_args(str(tmp_path / "m"))
    assert report["twin_bytes"] == tensor_parallel_bytes(args, ranks, 4)


def test_tensor_parallel_degrees_that_cannot_split_are_refused(world, tmp_path):
    with pytest.raises(ValueError, match="rollout.tensor_parallel=2 must divide the world size 1"):
        prepare(load_config(None, overrides(world, tmp_path / "a", **{
            "rollout.tensor_parallel": 2})), log=lambda *a: None)
    cfg = load_config(None, overrides(world, tmp_path / "b", **{"rollout.tensor_parallel": 4}))
    with pytest.raises(ValueError, match=r"must divide the policy's attention heads \(4\) and "
                                         r"key/value heads \(2\)"):
        check_checkpoints(cfg)
