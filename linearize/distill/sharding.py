"""What a distill checkpoint holds under every accelerate mode, and the new parameters' dtype.

A checkpoint keeps only what trains: the mixers' new parameters and LoRA's
(`params.safetensors`), the optimizer's state of those, and each process's RNG state.
`accelerator.save_state` cannot be used for it under FSDP: accelerate 1.x writes the whole
model's shards there (`save_fsdp_model`, with no way to skip it), and `get_state_dict` gathers
every weight to rank 0 for us to keep a few thousandths of them. So the checkpoint is written
here, the same way under every mode:

- the kept parameters: under FSDP each process's shards of the trainable parameters only
  (`get_model_state_dict(..., ignore_frozen_params=True)`, no gather), then those alone are
  gathered to rank 0 (`trainable_state`); elsewhere the main process's own;
- the optimizer: its full state keyed by parameter name (it covers the trainable parameters
  only), written by rank 0 as `optimizer.bin` and read by every process on resume, so a
  checkpoint of one mode resumes under another (stage 1 under DDP, stage 2 under FSDP);
- RNG (and the fp16 grad scaler): `random_states_<rank>.pkl` through accelerate's
  `save_accelerator_state`.

New parameters train in fp32 even when the model is loaded in bf16/fp16 (`model.dtype`):
`keep_new_parameters_fp32` casts them and makes the `nn.Linear` modules among them compute in
fp32 and hand their output back in the input's dtype; the mixers already lift their other new
parameters to fp32 where they use them.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..state import is_new_parameter

OPTIMIZER_FILE = "optimizer.bin"


class ShardingError(RuntimeError):
    """An accelerate mode or setting that distill cannot train under; the message says what to use."""


def is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def fsdp_version(accelerator) -> int | None:
    """1 or 2 under FSDP, else None."""
    return accelerator.state.fsdp_plugin.fsdp_version if is_fsdp(accelerator) else None


def check_mode(accelerator, dtype: str, stage1: bool) -> None:
    """ShardingError, before the model loads, for a mode whose checkpoints or training distill
    cannot do right.

    dtype: the recipe's model.dtype; stage1: stage 1 will train (the method has new parameters).
    """
    from accelerate.utils import DistributedType

    mode = accelerator.distributed_type
    if mode in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM, DistributedType.XLA):
        raise ShardingError(f"accelerate mode {mode.value} is not supported: its save_state writes the whole model "
                            "at every checkpoint; use single process, DDP (--multi_gpu) or FSDP")
    if not is_fsdp(accelerator):
        return
    if stage1:
        raise ShardingError("stage 1 cannot run under FSDP: its per-layer losses leave the layers beside their "
                            "outputs, so FSDP never regathers a layer's weights for the backward. Run stage 1 under "
                            "one process or DDP (--multi_gpu) and, once it is done, resume=true under FSDP (a "
                            "checkpoint of one mode resumes under another); or set stage1.enabled=false")
    if fsdp_version(accelerator) == 1 and dtype != "float32":
        raise ShardingError(f"FSDP 1 flattens each wrapped layer into one tensor of one dtype, so the fp32 new "
                            f"parameters cannot sit beside {dtype} weights: set model.dtype=float32 with accelerate's "
                            "mixed_precision: bf16 (FSDP keeps fp32 shards and computes in bf16), or use "
                            "fsdp_version: 2")


def trainable_state(accelerator, model) -> dict[str, torch.Tensor] | None:
    """The trainable parameters in full, on CPU on the main process (None elsewhere); FSDP only.

    Collective: every process must call it. Frozen weights are neither gathered nor copied.
    """
    from torch.distributed._state_dict_utils import _gather_state_dict
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    local = get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True))
    full = _gather_state_dict(local, cpu_offload=True, ranks_only=(0,))
    return full if accelerator.is_main_process else None


def save_state(accelerator, model, optimizer, folder: Path) -> None:
    """Write the optimizer and RNG state of a checkpoint into `folder` (every process calls it).

    The optimizer state is the full one, keyed by parameter name, whatever the mode: a
    checkpoint written under one process, DDP or FSDP resumes under any of them.
    """
    from accelerate.checkpointing import save_accelerator_state
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    optim = get_optimizer_state_dict(model, optimizer.optimizer, options=options)
    if accelerator.is_main_process:
        torch.save(optim, folder / OPTIMIZER_FILE)
    save_accelerator_state(str(folder), [], [], [], [], accelerator.process_index, accelerator.step,
                           accelerator.scaler)


def load_state(accelerator, model, optimizer, folder: Path) -> None:
    """Restore what `save_state` wrote (every process calls it and reads the small optimizer file).

    An optimizer state keyed by position (what `accelerator.save_state` wrote before) is loaded
    as it is, which is right for the one-process and DDP runs that wrote it.
    """
    from accelerate.checkpointing import load_accelerator_state
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    optim = torch.load(folder / OPTIMIZER_FILE, weights_only=False, map_location="cpu")
    positional = all(isinstance(i, int) for group in optim["param_groups"] for i in group["params"])
    if positional and not is_fsdp(accelerator):
        optimizer.optimizer.load_state_dict(optim)
    else:
        set_optimizer_state_dict(model, optimizer.optimizer, optim_state_dict=optim,
                                 options=StateDictOptions(full_state_dict=True))
    load_accelerator_state(str(folder), [], [], [], [], accelerator.process_index, accelerator.scaler)


def _to_dtype(tree, dtype: torch.dtype):
    if isinstance(tree, torch.Tensor):
        return tree.to(dtype) if tree.is_floating_point() else tree
    if isinstance(tree, (tuple, list)):
        return type(tree)(_to_dtype(t, dtype) for t in tree)
    return tree


def _fp32_linear_pre_hook(module: nn.Module, args):
    module._linearize_input_dtype = next((a.dtype for a in args if isinstance(a, torch.Tensor)), None)
    return _to_dtype(args, torch.float32)


def _fp32_linear_hook(module: nn.Module, args, output):
    dtype = module.__dict__.pop("_linearize_input_dtype", None)
    return _to_dtype(output, dtype) if dtype is not None and dtype != torch.float32 else output


def keep_new_parameters_fp32(model: nn.Module) -> int:
    """Cast the new parameters (names holding `linearize_`) of a bf16/fp16 model to fp32, in
    place; returns how many were cast.

    The `nn.Linear` modules among them compute in fp32 and return their input's dtype (so the
    model around them sees what it did before); the other new parameters are lifted to fp32 by
    the mixers where they are used. A model already in fp32 (or fp64) is left as it is.
    """
    cast = 0
    for name, module in model.named_modules():
        here = 0
        for pname, p in module.named_parameters(recurse=False):
            if is_new_parameter(f"{name}.{pname}") and p.is_floating_point() and p.dtype.itemsize < 4:
                p.data = p.data.float()
                here += 1
        if here and isinstance(module, nn.Linear) and not getattr(module, "_linearize_fp32", False):
            module.register_forward_pre_hook(_fp32_linear_pre_hook)
            module.register_forward_hook(_fp32_linear_hook)
            module._linearize_fp32 = True
        cast += here
    return cast
