"""Helpers shared by the tests and the benchmarks (bench/).

In memory, for unit tests: ``bus`` (the one FakeBus), ``reactors`` (a memory
reactor that is a wgkex IReactor), ``memory`` (object sizes), ``worker_fakes``
(the worker's kernel, WireGuard, rtnl and pool fakes), ``worker_tree`` (the
whole worker tree on those fakes), ``broker_fakes`` (the broker's API builder
and config), ``broker_api_case`` (requests to that API), ``mqtt_fakes`` (an MQTT
server by hand on a unix socket, and MqttService's base case), ``uapi_daemon``
(a fake wireguard-go UAPI daemon on a unix socket).

Real processes and namespaces, for integration tests and benchmarks:
``mosquitto``, ``rabbitmq``, ``cluster_lab``, ``kernelvm``, ``netns_relay``,
``mqtt_live`` (a cuttable proxy and paho watchers around a real mosquitto),
``broker_process`` (``twistd -n wgkex-broker`` and fake workers),
``worker_gateway`` (a namespace with wireguard-go, mosquitto and the real
worker), ``worker_probe`` (a worker's status listener inside its namespace),
``fake_uapi`` (a wireguard-go UAPI with 100,000 peers), ``mqtt_wire`` (MQTT by
hand), ``measure``, ``processes`` (stopping a subprocess of ours), ``browser``, ``skips``.
"""
