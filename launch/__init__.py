"""Launchers that start ``python -m medvl_jax.train`` as a multi-process job.

Run them from the repository root as modules:

    python -m launch.local --num_processes 2 --devices_per_process 2 -- --config ... --workdir ...
    python -m launch.slurm --nodes 2 --gpus_per_node 8 -- --config ... --workdir ...
    python -m launch.tpu --name my-tpu --zone us-central2-b --accelerator_type v4-32 -- ...

Everything after ``--`` goes to the training command unchanged. Each launcher has
``--dry_run``, which prints the exact commands (and, for SLURM, the batch script) without
running anything. The trainer itself joins the job through
:func:`medvl_jax.parallel.mesh.maybe_initialize_distributed`, which reads what these launchers
put in the environment. The launchers import neither JAX nor medvl_jax.
"""
