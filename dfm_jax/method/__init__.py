"""The paper as pure functions: no I/O, no mesh, no config.

* ``pyramid``: multiscale decompositions (Laplacian, Haar; standardised), exact inverses;
* ``objective``: the DFM training objective (stages, per-scale times, masks, loss);
* ``schedule`` (the staged sampling schedule and ``SamplerSettings``), ``solvers``
  (Euler, Heun), ``guidance`` (classifier-free guidance) and ``sampling`` (one scan);
* ``methods``: the ``Method`` interface (DFM, Flow Matching) that the trainer, the
  evaluation and the benchmark use; ``generation``: a method's sampler, jitted.
"""
