#!/usr/bin/env python3
"""Hold N idle HTTP/1.1 keep-alive connections open against 127.0.0.1:PORT (or HOST:PORT).

Usage: holdconns.py [HOST:]PORT N READY_FILE STOP_FILE [MAX_SECONDS]

Opens N connections, sends one keep-alive `GET /0` on each and reads the whole response,
then writes the number of connections that got a 200 to READY_FILE and keeps every socket
open until STOP_FILE appears or MAX_SECONDS (default 30) pass. Exits on its own either way.
"""
import os
import socket
import sys
import time


def read_response(sock: socket.socket) -> int:
    """Reads one response with a Content-Length body; returns its status code."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the response head")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the end of the body")
        body += chunk
    return status


def main() -> None:
    host, _, port = sys.argv[1].rpartition(":")
    host, port = host or "127.0.0.1", int(port)
    n, ready_file, stop_file = int(sys.argv[2]), sys.argv[3], sys.argv[4]
    max_seconds = float(sys.argv[5]) if len(sys.argv) > 5 else 30.0
    deadline = time.monotonic() + max_seconds
    request = b"GET /0 HTTP/1.1\r\nHost: app\r\nConnection: keep-alive\r\n\r\n"
    socks, ok = [], 0
    for _ in range(n):
        if time.monotonic() > deadline:
            break
        s = socket.create_connection((host, port), timeout=5)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        socks.append(s)
        try:
            s.sendall(request)
            if read_response(s) == 200:
                ok += 1
        except (OSError, ValueError, IndexError) as e:
            print(f"holdconns: {e}", file=sys.stderr)
    with open(ready_file + ".tmp", "w") as f:
        f.write(f"{ok}\n")
    os.rename(ready_file + ".tmp", ready_file)
    while not os.path.exists(stop_file) and time.monotonic() < deadline:
        time.sleep(0.05)
    for s in socks:
        s.close()


if __name__ == "__main__":
    main()
