"""Implementations in other frameworks, timed against ours and used as test references.

``torch_dfm_sit``: the PyTorch DFM-SiT and its Euler sampler; ``torch_peer``: its DFM
train step and sampler run as a separate process (``python -m dfm_jax.peers.torch_peer``);
``client``: the side of ``python -m dfm_jax.bench --peer=torch`` that drives that process
(no torch import). torch is a development dependency: ``pip install -r requirements-dev.txt``.
"""
