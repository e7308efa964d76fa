"""Several processes, one recipe (docs/training.md, "Several processes"): the losses of stages 2–3 are
computed on the **global** P×K batch (features gathered with their gradients), and BatchNorm layers
are synchronised, so N processes train as one process does on the same batch, up to the order of
float reductions.

Gradients: every process computes the same loss ``L`` on the gathered batch; the gather's backward
sums the gradients of all processes for each process's own rows (``N · dL/dx``) and DDP averages
the parameter gradients over the N processes, which gives ``dL/dθ`` — the one-process gradient.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from ..data.samplers import describe_pk_batch, identities_per_process
from ..modeling_ccafl import CCAFLOutput

if TYPE_CHECKING:
    from .arguments import CCAFLTrainingArguments

logger = logging.getLogger(__name__)


def num_processes() -> int:
    """Processes of the initialised default group (1 without `torch.distributed`)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _GatherWithGrad(torch.autograd.Function):
    """``[b, ...]`` per process -> ``[N·b, ...]`` in rank order; backward: the summed gradient of this rank's rows."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor)
        ctx.rows = tensor.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # every process's loss depends on every row
        rank = dist.get_rank()
        return grad[rank * ctx.rows : (rank + 1) * ctx.rows]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All processes' ``tensor`` (equal first dimensions) concatenated in rank order, differentiable;
    the tensor itself with one process. Integer tensors are gathered without gradient."""
    if num_processes() == 1:
        return tensor
    if not tensor.is_floating_point():
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)
    return _GatherWithGrad.apply(tensor)


def global_batch(
    outputs: CCAFLOutput, intra_ids: torch.Tensor, camids: torch.Tensor
) -> tuple[CCAFLOutput, torch.Tensor, torch.Tensor]:
    """The whole global batch for the losses: this process's ``[b, ·]`` features and labels -> ``[N·b, ·]`` of
    every process in rank order (the one-process batch, see `ccafl_hf.data.samplers`). Only the features the
    losses read (``reid_features``, ``alignment_features``) are gathered, with their gradients; the other
    fields are left out so no loss can read a per-process one by mistake. One process: unchanged."""
    if num_processes() == 1:
        return outputs, intra_ids, camids
    gathered = CCAFLOutput(
        reid_features=gather_with_grad(outputs.reid_features),
        alignment_features=None if outputs.alignment_features is None else gather_with_grad(outputs.alignment_features),
    )
    return gathered, gather_with_grad(intra_ids), gather_with_grad(camids)


def configure_processes(module: nn.Module, args: CCAFLTrainingArguments) -> int:
    """Set up stages 2–3 for ``args.world_size`` processes and return the per-device batch size.

    Default: P×K is the global batch, each process draws ``P / N`` identities (``ValueError`` naming P, N
    and the nearest valid P otherwise), the losses see the gathered batch and, unless
    ``--sync_batchnorm False``, the BatchNorm layers of ``module`` are synchronised. With
    ``--scale_batch_with_processes`` every process draws a whole P×K batch and computes its own losses
    (a warning says the recipe differs). One process: P×K, nothing converted.
    """
    n = args.world_size
    scale = args.scale_batch_with_processes
    if not scale:
        identities_per_process(args.num_identities_per_batch, n)
    if hasattr(module, "losses_on_global_batch"):
        module.losses_on_global_batch = not scale
    logger.info(describe_pk_batch(args.num_identities_per_batch, args.num_instances, n, scale))
    if n > 1 and scale:
        logger.warning(
            "--scale_batch_with_processes on %d processes: %d images per step and %d× the images per epoch at the same "
            "learning rate — not the preset's recipe. To keep the images per epoch, divide --iters_per_epoch by %d; "
            "without the flag the recipe is the same on any number of processes.",
            n, n * args.pk_batch_size, n, n,
        )
    if n > 1 and args.sync_batchnorm:
        converted = convert_sync_batchnorm(module)
        if converted:
            logger.info("synchronised %d BatchNorm layer(s) across %d processes (--sync_batchnorm False: "
                        "per-process statistics)", converted, n)
    return args.pk_batch_size if scale else args.pk_batch_size // n


class SynchronisedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch of all processes — the base of
    `SyncBatchNorm1d/2d/3d`, which stay instances of `nn.BatchNorm1d/2d/3d`.

    With several processes in training mode: on a GPU, `torch.nn.SyncBatchNorm`'s forward (its kernels
    and collectives) runs on this layer; on CPU processes (gloo), where torch has no SyncBatchNorm kernels
    and DDP refuses `torch.nn.SyncBatchNorm` layers, the batch mean and biased variance of all processes'
    samples normalise (gathered with their gradients) and the unbiased variance feeds the running
    statistics — what one process computes on the same global batch. Otherwise plain BatchNorm.
    """

    process_group = None  # the default group, as `torch.nn.SyncBatchNorm(process_group=None)`
    _check_non_zero_input_channels = nn.SyncBatchNorm._check_non_zero_input_channels

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and num_processes() > 1):
            return super().forward(input)
        if input.device.type != "cpu":
            return nn.SyncBatchNorm.forward(self, input)
        self._check_input_dim(input)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        count = gather_with_grad(torch.tensor([input.numel() // input.shape[1]], device=input.device)).sum()
        mean = gather_with_grad(input.sum(dims)[None]).sum(0) / count
        centred = input - mean.view(shape)
        var = gather_with_grad((centred * centred).sum(dims)[None]).sum(0) / count
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - momentum).add_(momentum * mean.detach())
                unbiased = var.detach() * count / max(int(count) - 1, 1)
                self.running_var.mul_(1 - momentum).add_(momentum * unbiased)
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.weight is not None:
            out = out * self.weight.view(shape)
        if self.bias is not None:
            out = out + self.bias.view(shape)
        return out


class SyncBatchNorm1d(SynchronisedBatchNorm, nn.BatchNorm1d):
    """A synchronised `nn.BatchNorm1d` (still an instance of it: ``isinstance(neck, nn.BatchNorm1d)`` holds)."""


class SyncBatchNorm2d(SynchronisedBatchNorm, nn.BatchNorm2d):
    """A synchronised `nn.BatchNorm2d` (still an instance of it)."""


class SyncBatchNorm3d(SynchronisedBatchNorm, nn.BatchNorm3d):
    """A synchronised `nn.BatchNorm3d` (still an instance of it)."""


_SYNC_CLASSES = {nn.BatchNorm1d: SyncBatchNorm1d, nn.BatchNorm2d: SyncBatchNorm2d, nn.BatchNorm3d: SyncBatchNorm3d}


def convert_sync_batchnorm(module: nn.Module) -> int:
    """Turn every ``BatchNorm1d/2d/3d`` of ``module`` into a synchronised one, in place (parameters,
    buffers — the BN neck's frozen bias buffer included — and ``requires_grad`` are kept: only the
    class changes, to a subclass of both). Returns the number of layers converted (0 when already done)."""
    converted = 0
    for layer in module.modules():
        if type(layer) in _SYNC_CLASSES:
            layer.__class__ = _SYNC_CLASSES[type(layer)]
            converted += 1
    return converted


__all__ = ["SyncBatchNorm1d", "SyncBatchNorm2d", "SyncBatchNorm3d", "SynchronisedBatchNorm", "configure_processes", "convert_sync_batchnorm",
           "gather_with_grad", "global_batch", "num_processes"]
