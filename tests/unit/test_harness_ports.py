"""The test harness's port picking: a port a dead container run still forwards is never handed out."""

from __future__ import annotations

from tests.harness import forwarded_ports

# What `iptables-save -t nat` shows after a netavark stack was killed without its teardown.
NETAVARK_LEFTOVERS = """\
*nat
:NETAVARK-DN-1D8721804F16F prerouting - [0:0]
-A NETAVARK-DN-1D8721804F16F -d 127.0.0.1/32 -p tcp -m tcp --dport 21500 -j DNAT --to-destination 10.88.0.7:8080
-A NETAVARK-DN-1D8721804F16F -p tcp -m tcp --dport 21510 -j DNAT --to-destination 10.88.0.9:9090
-A NETAVARK-HOSTPORT-DNAT -p tcp -m tcp --dport 21520:21522 -j NETAVARK-DN-1D8721804F16F
-A NETAVARK-HOSTPORT-DNAT -p udp -m multiport --dports 21600 -j NETAVARK-DN-1D8721804F16F
-A POSTROUTING -s 10.88.0.0/16 -j NETAVARK-1D8721804F16F
COMMIT
"""


def test_every_port_and_range_a_nat_rule_redirects_is_found() -> None:
    assert forwarded_ports(NETAVARK_LEFTOVERS) == {21500, 21510, 21520, 21521, 21522, 21600}


def test_a_table_without_redirects_forwards_nothing() -> None:
    assert forwarded_ports("*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n") == frozenset()
