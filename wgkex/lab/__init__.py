"""A local wgkex deployment in network namespaces, for the demo, e2e tests and benchmarks.

Run as root. Small blocking building blocks (safe to reuse in other tests and
benchmarks; their signatures are kept stable):

- :mod:`wgkex.lab.proc` -- :func:`~wgkex.lab.proc.spawn` a detached process and
  stop exactly it later (:class:`~wgkex.lab.proc.Proc`: PID + start time),
  :func:`~wgkex.lab.proc.run`, :func:`~wgkex.lab.proc.wait_until`,
  :class:`~wgkex.lab.proc.LabError`.
- :mod:`wgkex.lab.netns` -- :class:`~wgkex.lab.netns.Namespace` (``ip netns``),
  :func:`~wgkex.lab.netns.add_veth`, :func:`~wgkex.lab.netns.add_bridge`,
  :func:`~wgkex.lab.netns.add_address`, :func:`~wgkex.lab.netns.add_vxlan`,
  :func:`~wgkex.lab.netns.fdb_entries`, :func:`~wgkex.lab.netns.routes`.
- :mod:`wgkex.lab.wggo` -- :class:`~wgkex.lab.wggo.WireGuardGo`: a wireguard-go
  daemon in a namespace with a private ``/run/wireguard``
  (``.uapi_socket``, ``.enter_argv()``, ``.wg()``, ``.configure()``,
  ``.add_peer()``, ``.peers()`` -> :class:`~wgkex.lab.wggo.WgPeer`); :func:`~wgkex.lab.wggo.genkey`,
  :func:`~wgkex.lab.wggo.pubkey`.
- :mod:`wgkex.lab.mosquitto` -- :class:`~wgkex.lab.mosquitto.Mosquitto` with a
  TCP port on 127.0.0.1 and a unix socket for processes inside namespaces.

Built from them: :mod:`wgkex.lab.configs` (wgkex config files),
:mod:`wgkex.lab.gateway` (namespace + wg-welt + vx-welt + ``twistd
wgkex-worker``), :mod:`wgkex.lab.router` (a Gluon router's ``checkuplink``),
:mod:`wgkex.lab.lab` (the whole deployment with a state directory, ``up`` /
``down`` / ``status``) and :mod:`wgkex.lab.demo`. Command line: ``python -m
wgkex.lab up|down|status|demo``.
"""
