"""HLT-style deployment: event source -> distributor -> N workers -> collector over ZeroMQ.

Roles (each an OS process, see docs/deployment.md): :mod:`distributor`, :mod:`worker`,
:mod:`collector`; :mod:`run` starts a local farm, :mod:`control` talks to a running one.
"""
