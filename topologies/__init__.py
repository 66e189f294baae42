"""Packaged hardware data: node recipes (``*.yaml``) and the GPU / link catalogs (``catalog/*.yaml``).

Installed as ``sim.topologies``; read by :mod:`sim.hardware` and :mod:`sim.topology`.
"""
