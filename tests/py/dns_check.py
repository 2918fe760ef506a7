"""DNS helpers for the transparent tests, standard library only.

  dns_check.py serve ADDR:PORT NAME IPV4   answer A questions for NAME with IPV4 over UDP
                                           (NXDOMAIN for anything else), until killed
  dns_check.py ask-tcp SERVER NAME         ask SERVER:53 over TCP for NAME's A records and
                                           print each address (exit 1 if none)
"""
import socket
import struct
import sys


def question(msg):
    """(id, flags, name, qtype, end of the question) of a DNS message."""
    ident, flags, qd = struct.unpack("!HHH", msg[:6])
    labels, i = [], 12
    while msg[i]:
        labels.append(msg[i + 1 : i + 1 + msg[i]].decode())
        i += 1 + msg[i]
    qtype = struct.unpack("!H", msg[i + 1 : i + 3])[0]
    return ident, flags, ".".join(labels).lower(), qtype, i + 5


def serve(addr, name, ip):
    host, port = addr.rsplit(":", 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, int(port)))
    while True:
        msg, peer = s.recvfrom(4096)
        ident, flags, qname, qtype, end = question(msg)
        found = qname == name.lower()
        answers = 1 if found and qtype == 1 else 0
        rcode = 0 if found else 3
        head = struct.pack("!HHHHHH", ident, 0x8180 | rcode, 1, answers, 0, 0)
        body = msg[12:end]
        if answers:
            body += b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 30, 4) + socket.inet_aton(ip)
        s.sendto(head + body, peer)


def ask_tcp(server, name):
    q = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack("!HH", 1, 1)
    s = socket.create_connection((server, 53), timeout=10)
    s.sendall(struct.pack("!H", len(q)) + q)
    n = struct.unpack("!H", s.recv(2))[0]
    msg = b""
    while len(msg) < n:
        msg += s.recv(n - len(msg))
    ancount = struct.unpack("!H", msg[6:8])[0]
    _, _, _, _, i = question(msg)
    found = 0
    for _ in range(ancount):
        i += 2 if msg[i] & 0xC0 == 0xC0 else len(msg)  # a compressed name (all ours are)
        rtype, _, _, rdlen = struct.unpack("!HHIH", msg[i : i + 10])
        i += 10
        if rtype == 1:
            print(socket.inet_ntoa(msg[i : i + 4]))
            found += 1
        i += rdlen
    sys.exit(0 if found else 1)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        ask_tcp(sys.argv[2], sys.argv[3])
