"""Precision chosen from what the device runs natively (gptlab.device)."""

import os
import subprocess
import sys

import pytest
import torch

from gptlab import checkpoint, device
from gptlab.config import DEFAULT_RUNS, TrainConfig
from gptlab.train import pretrain, resolve
from tests.conftest import tiny_train_config

CPU = torch.device("cpu")
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


@pytest.mark.parametrize(("capability", "flags", "expected"), [
    ("AVX512", {"avx512f", "avx512_bf16"}, "bf16-mixed"),
    ("AVX512", {"avx512f", "amx_bf16"}, "bf16-mixed"),
    ("AVX512", {"avx512f"}, "fp32"),                 # AVX-512 without BF16 (Skylake-X): bf16 is emulated
    ("AVX2", {"avx2", "avx512_bf16"}, "fp32"),       # kernels lowered to AVX2 by ATEN_CPU_CAPABILITY
    ("AVX2", {"avx2", "fma"}, "fp32"),
])
def test_auto_precision_follows_the_cpus_bf16_support(monkeypatch, capability, flags, expected):
    monkeypatch.setattr(device, "cpu_capability", lambda: capability)
    monkeypatch.setattr(device, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(device.platform, "machine", lambda: "x86_64")
    precision, why = device.resolve_precision("auto", CPU)
    assert precision == expected
    assert ("has native bf16" in why) == (expected == "bf16-mixed")


def test_explicit_bf16_on_an_emulating_cpu_runs_with_a_warning(monkeypatch, capsys):
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)
    assert device.resolve_precision("bf16-mixed", CPU) == ("bf16-mixed", "as asked")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bf16-mixed is emulated" in err
    assert device.resolve_precision("fp32", CPU) == ("fp32", "as asked")
    assert capsys.readouterr().err == ""


def test_auto_is_not_an_autocast_precision():
    with pytest.raises(ValueError, match="resolve"):
        device.autocast(CPU, "auto")


def test_lowered_capability_is_seen_by_a_new_process():
    """The AVX2 settings the suite is also run under take effect: PyTorch reports AVX2 and auto picks fp32."""
    code = "from gptlab import device; import torch; print(device.cpu_capability(), *device.resolve_precision('auto', torch.device('cpu')))"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **AVX2_ENV}, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out[:2] == ["AVX2", "fp32"]


def test_training_logs_and_records_the_resolved_precision(data_dir, tmp_path):
    lines = []
    pretrain(tiny_train_config(data_dir, tmp_path, precision="auto", max_steps=2, eval_batches=1), log=lines.append)
    resolved, why = device.resolve_precision("auto", CPU)
    assert f"precision: {resolved} ({why})" in lines
    assert checkpoint.load(tmp_path / checkpoint.CKPT_NAME)["train_config"]["precision"] == resolved


@pytest.mark.parametrize(("native", "machine"), [(True, "native-bf16"), (False, "fp32")])
def test_default_run_follows_the_machine_class_and_flags_win(monkeypatch, native, machine):
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: native)
    lines = []
    cfg = resolve(TrainConfig(lr=5e-3), CPU, lines.append)
    run = DEFAULT_RUNS[machine]
    assert (cfg.preset, cfg.max_steps, cfg.batch_size, cfg.warmup_steps, cfg.lr) == (
        run["preset"], run["max_steps"], run["batch_size"], run["warmup_steps"], 5e-3)
    assert lines[-1] == (f"default run for a {machine} machine: preset {run['preset']}, max_steps {run['max_steps']}, "
                         f"batch_size {run['batch_size']}, warmup_steps {run['warmup_steps']}, "
                         f"eval_interval {run['eval_interval']}")
