"""Interface settings are checked against the host's interfaces before Horovod starts."""

import pytest

from tfllm import interfaces

PRESENT = ["eth0", "ib0", "lo"]


def check(**env):
    interfaces.check(env, present=PRESENT, host="node7")


def test_unset_or_present_names_and_subnets_pass():
    check()
    check(HOROVOD_GLOO_IFACE="eth0", OMPI_MCA_btl_tcp_if_include="eth0,ib0",
          OMPI_MCA_oob_tcp_if_include="10.0.0.0/8", NCCL_SOCKET_IFNAME="eth")
    check(NCCL_SOCKET_IFNAME="^docker,lo")
    check(NCCL_SOCKET_IFNAME="=ib0,eth9")  # NCCL uses whichever listed interface exists


@pytest.mark.parametrize("var,value,missing", [
    ("HOROVOD_GLOO_IFACE", "eth9", "eth9"),
    ("OMPI_MCA_btl_tcp_if_include", "eth0,eth9", "eth9"),  # Open MPI would drop the whole list
    ("OMPI_MCA_oob_tcp_if_include", "bond0", "bond0"),
    ("NCCL_SOCKET_IFNAME", "=eth", "=eth"),
])
def test_a_missing_interface_is_one_message_naming_host_variable_and_choices(var, value, missing):
    with pytest.raises(interfaces.InterfaceError) as e:
        check(**{var: value})
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"{var}={value}: no network interface {missing} on host node7 (it has: eth0, ib0, lo)")


def test_this_hosts_interfaces_include_loopback():
    assert "lo" in interfaces.host_interfaces()
