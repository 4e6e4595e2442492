"""Test-only: run `megatron-lite verify` with one bug planted in this process (torchrun starts one per
rank), so a test can check that verify fails on exactly the layouts that run the broken code.

    torchrun --nproc-per-node 4 tests/e2e/verify_bug.py BUG [verify arguments ...]

Bugs (each is a monkeypatch here; nothing in megatron_lite can switch them on):
    row-allreduce    RowParallelLinear skips its all-reduce (tensor parallelism without sequence
                     parallelism; the sequence-parallel reduce-scatter path is left intact)
    sp-grad-sync     the norm weights' / row biases' gradients are not summed over tp under
                     sequence parallelism
    pp-drop-grad     the pipeline's last stage drops the last micro-batch's gradient (its loss still
                     counts, so step 1's loss is right)
    dp-sum           the data-parallel gradient reduction sums instead of averaging (our backends:
                     the distributed optimizer's all-reduce / reduce-scatter; DeepSpeed reduces by
                     itself)
"""

import sys


def plant(bug: str) -> None:
    import torch.nn.functional as F

    from megatron_lite.optim.distributed import DistributedOptimizer
    from megatron_lite.parallel import grads, layers
    from megatron_lite.pipeline.engine import PipelineEngine
    if bug == "row-allreduce":
        real_forward = layers.RowParallelLinear.forward

        def forward(self, x):
            if self.sequence_parallel:
                return real_forward(self, x)
            y = F.linear(x, self.weight)  # the partial sum, never reduced over tp
            return y + self.bias if self.bias is not None else y
        layers.RowParallelLinear.forward = forward
    elif bug == "sp-grad-sync":
        grads.sync_sequence_parallel_grads = lambda model, group: None
    elif bug == "pp-drop-grad":
        real_run = PipelineEngine.run

        def run(self, batches, forward_only=False):
            if forward_only:
                return real_run(self, batches, forward_only)
            dropped, model_run = batches[-1][1], self.model.run

            def chunk(x, layers, labels=None, first=True, last=True):
                out = model_run(x, layers, labels, first=first, last=last)
                if last and labels is dropped:  # same loss value, zero gradient
                    return out[0], out[1].detach() + 0 * out[1]
                return out
            self.model.run = chunk
            try:
                return real_run(self, batches, forward_only)
            finally:
                del self.model.run
        PipelineEngine.run = run
    elif bug == "dp-sum":
        real_finish = DistributedOptimizer.finish

        def finish(self):
            real_finish(self)
            for b in self.buckets:  # the reduced main gradients, before clipping and the step
                b.grad_shard.mul_(self.dp)  # undo the mean: a sum
        DistributedOptimizer.finish = finish
    else:
        raise SystemExit(f"unknown bug {bug!r}")


if __name__ == "__main__":
    plant(sys.argv[1])
    from megatron_lite.cli import main
    from megatron_lite.distributed import comm
    code = main(["verify", *sys.argv[2:]])
    comm.exit_process(code)  # a finished distributed run skips native teardown (see comm.exit_process)
