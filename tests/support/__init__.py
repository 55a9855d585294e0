"""Helpers shared by the tests and the benchmarks (bench/).

In memory, for unit tests: ``bus`` (the one FakeBus), ``reactors`` (a memory
reactor that is a wgkex IReactor), ``memory`` (object sizes), ``worker_fakes``
(the worker's kernel, WireGuard, rtnl and pool fakes), ``broker_fakes`` (the
broker's API builder and config). Real processes and namespaces, for
integration tests and benchmarks: ``mosquitto``, ``rabbitmq``, ``cluster_lab``,
``kernelvm``, ``netns_relay``, ``worker_probe`` (a worker's
status listener inside its namespace), ``fake_uapi`` (a wireguard-go UAPI with
100,000 peers), ``mqtt_wire`` (MQTT by hand), ``measure``, ``browser``, ``skips``.
"""
