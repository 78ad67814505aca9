"""What the loss of an optimisation step is divided by (`dft_normalization`), in one place.

The loss functions (`asft_trl.losses`) divide each micro-batch's sum by the N they are given: the step's number of
completion tokens over every accumulation micro-batch and process (the Trainer's `num_items_in_batch`), so that any
batch x accumulation split and any number of processes give the same gradient. `StepNormalization` does the rest,
for the trainer's `compute_loss` and `training_step`:

- `"tokens"` (the default, the paper's): the step's loss is divided by N, and since DDP averages the gradients of the
  processes while N counts all their tokens, the loss is multiplied by the number of processes, as TRL does.
- `"weights"`: the step's loss is divided by W, the sum of the DFT weights over the step's micro-batches and
  processes. The weights depend on the policy, so W is known only after the step's last forward: each micro-batch's
  loss stays divided by N while its weight sum is added up here, and once the last micro-batch is done (the Trainer
  marks it with `accelerator.sync_gradients`, and clips and steps right after) the step's gradients are multiplied
  by N / W. An evaluation batch is a step of its own and is rescaled at once. DeepSpeed clips and steps inside its own
  backward, so it is refused (`refuse_weights_under_deepspeed`, from the config and again at the launch).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# `ASFTConfig.dft_normalization` values
DFT_NORMALIZATIONS = ("tokens", "weights")
WEIGHTS_UNDER_DEEPSPEED = (
    "dft_normalization='weights' rescales the optimizer step's gradients before clipping, and DeepSpeed clips and "
    "steps inside its own backward. Use DDP or FSDP2, or dft_normalization='tokens' (with Adam the scale of the loss "
    "barely matters; docs/method.md)."
)


def refuse_weights_under_deepspeed(dft_normalization: str, deepspeed: bool) -> None:
    """Refuse `dft_normalization="weights"` under DeepSpeed: named in the config (`deepspeed=`), or the launch's."""
    if dft_normalization == "weights" and deepspeed:
        raise ValueError(WEIGHTS_UNDER_DEEPSPEED)


class StepNormalization:
    """The trainer's side of the step's normalisation (see the module docstring), with the step's running sums.

    Args:
        args: the `ASFTConfig` (`dft_normalization`, `average_tokens_across_devices`, `world_size`).
        accelerator: the trainer's accelerator (the number of processes, gathering W).
        tp_size: the trainer's tensor-parallel size (ranks of one tensor-parallel group hold the same tokens).
    """

    def __init__(self, args, accelerator, tp_size: Callable[[], int]):
        self.args, self.accelerator, self.tp_size = args, accelerator, tp_size
        self.by_weights = args.dft_normalization == "weights"
        # The step so far, under "weights": its DFT weight sum, its token count N, and what training_step returned
        self.weight_sum: torch.Tensor | float = 0.0
        self.items = None
        self.loss: torch.Tensor | float = 0.0

    def normalize(self, mode: str, loss: torch.Tensor, weights: torch.Tensor, num_items_in_batch, local_items: int):
        """A micro-batch's loss as the Trainer should backpropagate it: already divided by N (the loss did it), times
        the processes DDP averages over; under "weights", the micro-batch's weight sum is added to the step's
        (training) or the batch is rescaled by N / W at once (evaluation)."""
        # Like TRL: `num_items_in_batch` counts the tokens of every process, and DDP averages gradients across them
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.tp_size())
        if not self.by_weights:
            return loss
        weight_sum = weights.detach().float().sum()
        if mode == "train":
            if num_items_in_batch is None:
                raise RuntimeError(
                    "dft_normalization='weights' needs the Trainer's num_items_in_batch (the step's token count) to "
                    "rescale the step; it was not given. Use dft_normalization='tokens'."
                )
            self.weight_sum = weight_sum + self.weight_sum
            self.items = num_items_in_batch
            return loss
        items = local_items if num_items_in_batch is None else num_items_in_batch
        return loss * self.scale(items, weight_sum, gathered=num_items_in_batch is not None)

    def scale(self, items, weight_sum: torch.Tensor, gathered: bool) -> torch.Tensor:
        """N / W, with W summed over the processes that N (`num_items_in_batch`) counts, as the Trainer counts N."""
        if gathered and self.args.average_tokens_across_devices and self.args.world_size > 1:
            # Tensor-parallel ranks hold the same tokens (the Trainer divides N by the same factor)
            weight_sum = self.accelerator.gather(weight_sum.reshape(1)).sum() / self.tp_size()
        items = torch.as_tensor(items, device=weight_sum.device, dtype=torch.float32)
        # W is 0 only if every weight underflowed; the task gradient is then 0 too, so leave the step as it is
        return torch.where(weight_sum > 0, items / weight_sum.clamp_min(1e-30), torch.ones_like(items))

    def after_backward(self, model: torch.nn.Module, loss: torch.Tensor) -> torch.Tensor:
        """After a micro-batch's backward (`training_step`): under "weights", once the step's last micro-batch is done,
        multiply the step's gradients by N / W and start the next step's sums. Returns what `training_step` should
        return, so that the Trainer's logged loss (the sum over the step) is the weight-normalised one."""
        if not self.by_weights:
            return loss
        step_loss = loss + self.loss  # what the step's micro-batches returned so far
        # The Trainer sets `sync_gradients` for the step's last micro-batch, and clips and steps right after it
        if not self.accelerator.sync_gradients:
            self.loss = step_loss
            return loss
        scale = self.scale(self.items, self.weight_sum, gathered=True)
        factor = float(scale)  # a Python number multiplies any gradient, sharded (DTensor) ones included
        with torch.no_grad():
            for param in model.parameters():
                if param.grad is not None:
                    param.grad.mul_(factor)
        self.loss = self.weight_sum = 0.0
        # The Trainer logs the sum of what this returns over the step: make that sum the weight-normalised loss
        return loss + step_loss * (scale - 1)
