"""Test-only: let accelerate run FSDP(2) on CPU processes (gloo), so that the FSDP2 launch shape can be tested here.

accelerate drops the FSDP plugin when the distributed type is MULTI_CPU (it only switches to FSDP for GPU-like
devices) and the Trainer then trains plain DDP, with the same numbers. `allow_fsdp_on_cpu()` overrides that one
decision: after `AcceleratorState.__init__`, a CPU run that was given an FSDP plugin keeps it and becomes FSDP, as it
would on GPUs. Everything after that (`fully_shard`, the Trainer's FSDP paths, TRL's `prepare_fsdp`) is the libraries'
own code. This lives in tests/ on purpose: the package must never change how accelerate picks the distributed type.
"""

from __future__ import annotations


def allow_fsdp_on_cpu() -> None:
    """Patch `AcceleratorState.__init__` (idempotent) as described in the module docstring."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    if getattr(AcceleratorState.__init__, "_asft_fsdp_on_cpu", False):
        return
    original = AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            self.distributed_type = DistributedType.FSDP
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    __init__._asft_fsdp_on_cpu = True
    AcceleratorState.__init__ = __init__
