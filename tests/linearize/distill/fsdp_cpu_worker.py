"""`accelerate launch --multi_gpu` worker that runs `distill` under FSDP on CPU (gloo).

accelerate turns a CPU launch into MULTI_CPU (data parallel) even with `--use_fsdp`: its
state makes FSDP only out of the GPU-like multi-process modes. Torch's FSDP itself runs on
CPU over gloo, so this worker builds the Accelerator as accelerate does for CPU and then
switches it to FSDP with the plugin FSDP would get on GPUs, before `distill` prepares
anything.

    python -m accelerate.commands.launch --multi_gpu --num_processes 2 fsdp_cpu_worker.py \
        FSDP_VERSION RECIPE [key=value ...]
"""
from __future__ import annotations

import sys

import accelerate
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin


def fsdp_plugin(version: int) -> FullyShardedDataParallelPlugin:
    """The plugin of recipes/accelerate/fsdp_8gpu.yaml (decoder layers wrapped, sharded state)."""
    common = dict(fsdp_version=version, auto_wrap_policy="transformer_based_wrap",
                  transformer_cls_names_to_wrap=["LlamaDecoderLayer"], state_dict_type="SHARDED_STATE_DICT",
                  sync_module_states=False, cpu_ram_efficient_loading=False)
    if version == 1:
        return FullyShardedDataParallelPlugin(sharding_strategy="FULL_SHARD", use_orig_params=True, **common)
    return FullyShardedDataParallelPlugin(reshard_after_forward=True, **common)


class CpuFsdpAccelerator(accelerate.Accelerator):
    version = 2

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.state.fsdp_plugin = fsdp_plugin(self.version)
        self.state.distributed_type = DistributedType.FSDP
        accelerate.PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def main(argv: list[str]) -> None:
    CpuFsdpAccelerator.version = int(argv[0])
    accelerate.Accelerator = CpuFsdpAccelerator  # distill imports it when the run starts
    from linearize.distill import distill, load_recipe

    print(distill(load_recipe(argv[1], argv[2:])), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
