"""Training: settings -> setup -> loop.

* ``setup``: mesh, data source, method, optimizer and sharded state layout (shared with
  evaluation and the benchmark);
* ``train_step``: the pure train step (optimizer, EMA, non-finite guard);
* ``loop``: the one trainer of every method, with its periodic actions;
* ``checkpoint`` (Orbax), ``preemption`` (SIGTERM), ``samples`` (grids and previews),
  ``decoding`` (the autoencoder of latent configs), ``perf`` (FLOPs, peaks),
  ``workdir_lock`` (one trainer per workdir, a writable workdir).
"""
