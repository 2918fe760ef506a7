"""A steady HTTP load for the tests, standard library only.

  steady_load.py URL RATE SECONDS [TIMEOUT]

Sends RATE GET requests a second for SECONDS (each on a fresh connection, from a pool of
threads, so a slow answer does not slow the rate), each with TIMEOUT seconds (default 3).
Prints one JSON object: requests sent, failures, and for each failure when it was sent
(seconds from the start) and why.
"""
import concurrent.futures
import json
import sys
import time
import urllib.request


def one(url, timeout, sent):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            r.read()
            return None if r.status == 200 else (sent, f"status {r.status}")
    except Exception as e:  # noqa: BLE001 - every failure is reported, whatever it is
        return (sent, type(e).__name__ + ": " + str(e)[:80])


def main():
    url, rate, seconds = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    timeout = float(sys.argv[4]) if len(sys.argv) > 4 else 3.0
    start = time.monotonic()
    futures = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=64) as pool:
        n = 0
        while n < rate * seconds:
            due = start + n / rate
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            futures.append(pool.submit(one, url, timeout, round(time.monotonic() - start, 3)))
            n += 1
    failures = [f.result() for f in futures if f.result() is not None]
    print(json.dumps({"sent": len(futures), "failed": len(failures), "failures": failures}))


if __name__ == "__main__":
    main()
