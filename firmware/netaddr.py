"""Host names and addresses (docs/network.md): what getaddrinfo can answer without asking DNS,
which blocks on a board. Shared by the MQTT link and the SNTP client."""


def numeric_host(host):
    """A dotted IPv4 or an IPv6 address: getaddrinfo answers it without the network."""
    if ":" in host:  # IPv6: hex digits, ':' and '.' only ("host:port" is a name for DNS)
        if host.count(":") < 2:
            return False
        for c in host:
            if not ("0" <= c <= "9" or "a" <= c <= "f" or "A" <= c <= "F" or c in ":."):
                return False
        return True
    parts = host.split(".")
    if len(parts) != 4:
        return False
    for p in parts:
        if not 0 < len(p) <= 3:
            return False
        for c in p:
            if not "0" <= c <= "9":
                return False
        if int(p) > 255:  # 192.168.1.300 is no address: getaddrinfo would ask DNS
            return False
    return True
