"""The toy's numerics pinned to AVX2 code paths (pbrl/numerics.py): what makes its tables the same
on other CPUs and thread counts (docs/toy.md)."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT, subprocess_env
from pbrl import numerics, toy

SHOW = "from pbrl import numerics; numerics.pin(); import torch; print(numerics.describe()['aten'])"


def aten_in_fresh_process(**env) -> str:
    done = subprocess.run([sys.executable, "-c", SHOW], cwd=ROOT, capture_output=True, text=True,
                          env={**subprocess_env(), **env}, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_pin_overrides_what_the_machine_or_the_user_chose_unless_told_native():
    """A CPU's own choice (emulated by ATEN_CPU_CAPABILITY) no longer reaches the toy's
    arithmetic; PBRL_TOY_NUMERICS=native gives it back, anything else is refused."""
    assert aten_in_fresh_process(ATEN_CPU_CAPABILITY="default") == "AVX2"
    assert aten_in_fresh_process(ATEN_CPU_CAPABILITY="default", PBRL_TOY_NUMERICS="native") == \
        "DEFAULT"
    done = subprocess.run([sys.executable, "-c", SHOW], cwd=ROOT, capture_output=True, text=True,
                          env={**subprocess_env(), "PBRL_TOY_NUMERICS": "avx512"}, timeout=120)
    assert done.returncode != 0 and "expected 'pinned' (the default) or 'native'" in done.stderr


def test_a_cached_world_is_rebuilt_on_other_numerics(tmp_path, monkeypatch):
    """The numerics are part of a toy world's cache key: the same settings trained on other
    kernels give another warm start, which must not be reused as this machine's."""
    def build():
        return toy.build_world(0, root=tmp_path, n_train=20, n_eval=4, sft_steps=2, width=16,
                               layers=1, log=lambda *a: None)
    build()
    first = json.loads((tmp_path / "complete.json").read_text())
    assert first["numerics"]["aten"] == numerics.describe()["aten"]
    stamp = (tmp_path / "warmstart" / "model.safetensors").stat().st_mtime_ns
    build()  # the same numerics: reused
    assert (tmp_path / "warmstart" / "model.safetensors").stat().st_mtime_ns == stamp
    other = {**numerics.describe(), "aten": "DEFAULT"}
    monkeypatch.setattr(numerics, "describe", lambda: other)
    build()
    assert json.loads((tmp_path / "complete.json").read_text())["numerics"]["aten"] == "DEFAULT"
    assert (tmp_path / "warmstart" / "model.safetensors").stat().st_mtime_ns != stamp


@pytest.mark.parametrize("pinned, suffix", [(True, ""), (False, "-avx512")])
def test_an_unpinned_world_gets_a_directory_of_its_own(monkeypatch, pinned, suffix):
    """A native-numerics run (the reading-path tool's, say) does not evict the pinned world."""
    monkeypatch.setattr(numerics, "describe", lambda: {
        "aten": "AVX2" if pinned else "AVX512", "mkl_cbwr": numerics.PINNED["MKL_CBWR"]
        if pinned else "-", "onednn_isa": "-", "threads": "1", "torch": "x"})
    assert numerics.tag() == suffix
