"""Data-parallel training with PyTorch's own torch.distributed: process group from torchrun's
environment, DDP or FSDP2 (`fully_shard`) wrapping, world-size independent checkpoint state, and the
`gptlab train --nproc N` launcher. Everything is a no-op in a single process.

The same code runs on CPUs (gloo backend) and GPUs (NCCL, one process per GPU, cuda:LOCAL_RANK).
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist

from gptlab.checkpoint import CheckpointError
from gptlab.config import ConfigError
from gptlab.model import GPT, Block

Strategy = Literal["ddp", "fsdp"]


@dataclass(frozen=True)
class World:
    """This process's place among the data-parallel ranks."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone prints, logs and writes checkpoints."""
        return self.rank == 0


def world() -> World:
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def local_rank() -> int | None:
    """Set by torchrun (and by our own spawners) for every worker; None in a plain process."""
    value = os.environ.get("LOCAL_RANK")
    return int(value) if value is not None else None


@contextlib.contextmanager
def session(device: torch.device) -> Iterator[World]:
    """Join the process group that torchrun describes in the environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT); re-entrant, and it only tears down a group it created itself."""
    created = False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if device.type == "cuda":
            if device.index >= torch.cuda.device_count():
                raise ConfigError(f"process {os.environ.get('RANK')} needs {device} but this machine shows "
                                  f"{torch.cuda.device_count()} GPU(s): use at most that many processes per node")
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        created = True
    try:
        yield world()
    finally:
        if created:
            dist.destroy_process_group()


def barrier() -> None:
    if world().size > 1:
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over all ranks (one collective); identity in a single process."""
    if world().size == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def parallelize(model: torch.nn.Module, strategy: Strategy, device: torch.device,
                mixed_dtype: torch.dtype | None) -> torch.nn.Module:
    """Return the module to train: `model` itself in one process, a DDP wrapper around it, or `model`
    sharded in place by FSDP2 (each transformer block is one all-gather unit, the root holds the rest)."""
    if world().size == 1:
        return model
    if strategy == "ddp":
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # low-precision all-gathers halve the traffic; gradients are still reduced in fp32
    policy = MixedPrecisionPolicy(param_dtype=mixed_dtype, reduce_dtype=torch.float32 if mixed_dtype else None)
    for module in model.modules():
        if isinstance(module, Block):
            fully_shard(module, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def grad_sync(model: torch.nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce / reduce-scatter on all but the last micro-batch of a step."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not enabled:
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # an FSDP2 module
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def full_norm(norm: torch.Tensor) -> float:
    """The total gradient norm as a number (under FSDP it is a DTensor over the shards)."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


# --- checkpoint state --------------------------------------------------------------------------
# (torch.distributed.checkpoint is imported on first use: it takes seconds to import)
def gather_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state on CPU, keyed by parameter name: the same format
    whether the run was single-process, DDP or FSDP, so any world size can load it. A collective:
    every rank calls it; under FSDP only rank 0 receives the tensors."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    module = unwrap(model)
    model_state, optimizer_state = get_state_dict(module, optimizer,
                                                  options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # the module's own state_dict() decides what a checkpoint holds (LoRA runs keep only the adapters)
    keep = module.state_dict().keys()
    return {name: t for name, t in model_state.items() if name in keep}, optimizer_state


def load_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, torch.Tensor],
               optimizer_state: dict[str, Any]) -> None:
    """Load gather_state's output into a model of any world size or strategy (every rank passes the
    full state it read from the checkpoint file)."""
    module = unwrap(model)
    expected = {name: tuple(t.shape) for name, t in module.state_dict().items()}  # DTensors give full shapes
    found = {name: tuple(t.shape) for name, t in model_state.items()}
    if expected != found:
        wrong = sorted(set(expected) ^ set(found)) or [n for n in expected if expected[n] != found[n]]
        raise CheckpointError(f"checkpoint does not fit the model config: {wrong[0]}: checkpoint "
                              f"{found.get(wrong[0], 'missing')}, model {expected.get(wrong[0], 'missing')}")
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    # not strict: the keys were checked against the module's own state_dict() above, which may be partial
    set_state_dict(module, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                   options=StateDictOptions(full_state_dict=True, strict=False))


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def rng_state(device: torch.device) -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    if "python" in state:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])


def gather_rng_states(device: torch.device) -> list[dict[str, Any]]:
    """Every rank's RNG states (dropout masks differ per rank), collected for rank 0's checkpoint."""
    state = rng_state(device)
    if world().size == 1:
        return [state]
    states: list[Any] = [None] * world().size
    dist.all_gather_object(states, state)
    return states


def gpt_of(model: torch.nn.Module) -> GPT:
    """The GPT inside whatever is being trained (itself, a DDP wrapper, a task model holding one)."""
    found = next((m for m in model.modules() if isinstance(m, GPT)), None)
    if found is None:
        raise TypeError(f"{type(model).__name__} holds no GPT model")
    return found


# --- launcher ----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(nproc: int, module_args: list[str]) -> int:
    """`gptlab train --nproc N ...`: run `torchrun --nproc-per-node N -m gptlab train ...` on this
    machine (rendezvous on 127.0.0.1) and return its exit status. On several nodes call torchrun yourself."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "gptlab", *module_args]
    env = dict(os.environ)
    # torchrun would give each process one thread; on CPUs share the cores between the processes instead
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.run(command, env=env, check=False).returncode
