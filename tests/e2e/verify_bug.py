"""Test-only: run `megatron-lite verify` with one bug planted in this process (torchrun starts one per
rank), so a test can check that verify fails on exactly the layouts that run the broken code.

    torchrun --nproc-per-node 4 tests/e2e/verify_bug.py BUG[,BUG...] [verify arguments ...]

Several bugs (needs --json OUT): one verify per bug in turn, in one launch (torch, DeepSpeed and the
process group are set up once), each bug planted alone and removed after its run; bug B's table goes
to OUT.B and rank 0 prints "==== bug B (exit N)" after it.

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

import os
import sys


def plant(bug: str):
    """Plant `bug`; returns the function that removes it."""
    import torch.nn.functional as F

    from megatron_lite.optim.distributed import DistributedOptimizer
    from megatron_lite.parallel import grads, layers
    from megatron_lite.pipeline.engine import PipelineEngine
    saved = [(layers.RowParallelLinear, "forward", layers.RowParallelLinear.forward),
             (grads, "sync_sequence_parallel_grads", grads.sync_sequence_parallel_grads),
             (PipelineEngine, "run", PipelineEngine.run),
             (DistributedOptimizer, "finish", DistributedOptimizer.finish)]

    def undo():
        for owner, name, value in saved:
            setattr(owner, name, value)
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

        def run(self, batches, forward_only=False, **kwargs):
            if forward_only:
                return real_run(self, batches, forward_only, **kwargs)
            dropped, model_run = batches[-1][1], self.model.run

            def chunk(x, layers, labels=None, first=True, last=True, **kwargs):
                out = model_run(x, layers, labels, first=first, last=last, **kwargs)
                if last and labels is dropped:  # same loss value, zero gradient
                    return out[0], out[1].detach() + 0 * out[1]
                return out
            self.model.run = chunk
            try:
                return real_run(self, batches, forward_only, **kwargs)
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
    return undo


def verify_each(bugs: list[str], argv: list[str]) -> int:
    """`megatron-lite verify argv` once per bug, bug B's table to `--json`'s path + ".B"; the worst
    exit status. Each run is the real command; only the process group outlives it (verify uses a
    group that exists as is), for the next run."""
    from megatron_lite.cli import main
    from megatron_lite.distributed import comm
    json_path = argv[argv.index("--json") + 1]
    real_destroy, worst = comm.destroy, 0
    comm.destroy = lambda barrier=True: None
    try:
        for bug in bugs:
            undo = plant(bug)
            try:
                code = main(["verify", *argv, "--json", f"{json_path}.{bug}"])  # the last --json counts
            finally:
                undo()
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"==== bug {bug} (exit {code})", flush=True)
            worst = max(worst, code)
    finally:
        comm.destroy = real_destroy
    comm.destroy()
    return worst


if __name__ == "__main__":
    from megatron_lite.distributed import comm
    bugs = sys.argv[1].split(",")
    if len(bugs) == 1:
        plant(bugs[0])
        from megatron_lite.cli import main
        code = main(["verify", *sys.argv[2:]])
    else:
        code = verify_each(bugs, sys.argv[2:])
    comm.exit_process(code)  # a finished distributed run skips native teardown (see comm.exit_process)
