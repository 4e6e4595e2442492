"""`megatron-lite verify`: every parallel layout that fits this job, trained against the serial model.

    torchrun --standalone --nproc-per-node 4 -m megatron_lite.cli verify [--layouts PAT ...] [--steps 3]
    srun --ntasks 4 megatron-lite verify --json verify.json        # SLURM: one task per rank
    torchrun --standalone --nproc-per-node 4 -m megatron_lite.cli verify --moe   # expert parallelism

For each layout tp x cp x pp x dp = world size (tensor parallelism with and without sequence
parallelism; context parallelism with each algorithm; each pipeline schedule, interleaved with 2
virtual stages where the blocks allow; data parallelism plain, with native ZeRO 1-3 and with
DeepSpeed ZeRO 1-3; under --moe, a mixture-of-experts model, also expert parallelism: every ep
the layout rules accept, and nothing they refuse MoE, e.g. sequence parallelism or DeepSpeed; and
their combinations; names as tp2+sp.pp2:1f1b.dp2:zero1, tp2.dp2:zero1.ep2, select.py) a tiny GPT built here
trains a few AdamW steps through the real Trainer and backend, from the same seed and on the same
global batches (random tokens written to a per-rank temporary token store) as the serial model,
which every rank also trains by itself (under --moe every run takes micro-batches of the same size:
the balancing loss is per micro-batch, select.MOE_MICRO_BATCH). Compared, for every layout:
    loss    every step's training loss and one evaluation (forward-only) loss at the end
    norm    every step's global gradient norm (what clipping uses; clipping engages)
    grad    step 1's finished gradients (data-parallel mean, sequence-parallel sums, tied-embedding
            sum; before clipping), each rank's slices (its tp slice, its ep share of the experts)
            against the same slices of the serial gradient (TPSharder: the slicing table that
            parallelizes the model and checkpoints it)
    param   every weight after the last step (DeepSpeed: its fp32 masters, through the accessors
            the checkpoint uses)
Every serial parameter must be compared by some rank. Rank 0 prints one row per layout and exits 1
if any layout is outside the tolerances (TOLERANCES, below).

The layouts run one after another inside one job: each builds its own process groups (every rank
calls Topology.build in the same order). By default each tp x cp x pp x dp factorization of the world
size runs a few variants that together use every variant of each of its axes (sequence parallelism,
cp algorithm, schedule, ZeRO backend and stage, ep) at least once; --layouts picks from all valid
combinations.

The modules:
  select   the candidate layouts (every valid Variant at this world size), the default selection,
           the tiny model and run (make_config), the checked arguments (select_layouts)
  run      the serial reference and each layout through the real Trainer; step 1's gradients come
           from the backend's on_grads_finished hook; verify() = select, run, report
  compare  TOLERANCES and one rank's differences from the serial run (compare -> Row)
  report   the table (header, one row per layout) and the JSON
  cli      the sub-parser and command (registering it imports nothing heavy)
"""
