"""Tensor-parallel rollouts (rollout.tensor_parallel): torchrun with 2 and 4 ranks (gloo, DTensor)
decode what one process decodes, no rank holds more than its shards, the planner counts those
shards exactly, and a training run with TP equals one without."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, overrides, save_hf_model, subprocess_env
from pbrl.config import load_config
from pbrl.memory import model_args, tensor_parallel_bytes
from pbrl.setup import check_checkpoints, prepare
from test_objectives import run_train
from test_throughput import ONE_STEP

SHARDED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
           "embed_tokens", "lm_head")


@pytest.mark.parametrize("ranks", [2, 4])
def test_tensor_parallel_decoding_equals_one_process(tmp_path, ranks):
    """Each rank decodes alone (its whole model), then the ranks as one group on the twin
    refreshed from the FSDP-sharded model, eager and (2 ranks) compiled (aot_eager, fullgraph): the
    same greedy and sampled tokens, log-probs to fp32 rounding. Every twin weight is 1/ranks of the
    whole (norms whole), the refresh gathers no tensor larger than the largest weight, the shards
    are freed after a rollout (kept when asked), and their bytes are the planner's."""
    save_hf_model(tmp_path / "m", "qwen3", num_attention_heads=8, num_key_value_heads=4,
                  tie_word_embeddings=True)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run",
                           f"--nproc_per_node={ranks}", "--standalone",
                           str(Path(ROOT) / "tests" / "scripts" / "tp_decode.py"),
                           str(tmp_path / "m"), str(tmp_path / "report.json"),
                           *(["--compile"] if ranks == 2 else [])], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    for key in ("greedy", "sampled"):
        assert report[key]["together"] == report[key]["alone"]
        assert report[key]["logprob_gap"] < 1e-5
    assert report["again"] == report["sampled"]["alone"]
    assert ranks != 2 or report["compiled"] == report["again"]
    assert report["kept"] and report["freed"]
    assert report["largest_gathered"] <= report["largest_parameter"]
    for name, (local, whole) in report["shards"].items():
        sharded = any(part in name for part in SHARDED)
        assert local == (whole // ranks if sharded else whole), name
    args = model_args(str(tmp_path / "m"))
    assert report["twin_bytes"] == tensor_parallel_bytes(args, ranks, 4)


def test_a_tensor_parallel_run_trains_as_one_without(world, tmp_path):
    """2 ranks (FSDP2) decoding as one tensor-parallel group against one process decoding every
    row (which 2 ranks without TP equal, tests/test_train.py): the same rollouts, so the same
    metrics step for step."""
    plain = run_train(world, tmp_path / "plain", 1, **ONE_STEP)
    tp = run_train(world, tmp_path / "tp", 2, **ONE_STEP, **{"rollout.tensor_parallel": 2})
    for a, b in zip(plain, tp, strict=True):
        for key in ("reward", "policy_loss", "entropy", "grad_norm", "response_length",
                    "logprob_mismatch"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key


def test_tensor_parallel_degrees_that_cannot_split_are_refused(world, tmp_path):
    with pytest.raises(ValueError, match="rollout.tensor_parallel=2 must divide the world size 1"):
        prepare(load_config(None, overrides(world, tmp_path / "a", **{
            "rollout.tensor_parallel": 2})), log=lambda *a: None)
    cfg = load_config(None, overrides(world, tmp_path / "b", **{"rollout.tensor_parallel": 4}))
    with pytest.raises(ValueError, match=r"must divide the policy's attention heads \(4\) and "
                                         r"key/value heads \(2\)"):
        check_checkpoints(cfg)
