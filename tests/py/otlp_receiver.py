"""An OTLP/gRPC trace receiver for the tests: a grpcio server built from the
opentelemetry-proto definitions that prints each span it receives as one JSON line on stdout.

    python otlp_receiver.py PORT [--slow SECONDS] [--count-only]

`--slow` holds every export that long before answering (a collector that cannot keep up);
`--count-only` prints only a count of spans every second (for benchmarks).
"""
import argparse
import json
import sys
import threading
import time
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


def value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, slow, count_only):
        self.slow = slow
        self.count_only = count_only
        self.spans = 0
        # Exports arrive on several threads: each one's lines are written whole, under a lock,
        # so lines of two exports never interleave.
        self.lock = threading.Lock()

    def Export(self, request, context):
        if self.slow:
            time.sleep(self.slow)
        if self.count_only:
            self.spans += sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
            return trace_service_pb2.ExportTraceServiceResponse()
        lines = []
        for rs in request.resource_spans:
            resource = {a.key: value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    line = {
                        "service": resource.get("service.name"),
                        "trace_id": s.trace_id.hex(),
                        "span_id": s.span_id.hex(),
                        "parent_span_id": s.parent_span_id.hex(),
                        "name": s.name,
                        "kind": s.kind,
                        "start": s.start_time_unix_nano,
                        "end": s.end_time_unix_nano,
                        "status": s.status.code,
                        "attributes": {a.key: value(a.value) for a in s.attributes},
                        "events": [e.name for e in s.events],
                    }
                    lines.append(json.dumps(line) + "\n")
        with self.lock:
            sys.stdout.write("".join(lines))
            sys.stdout.flush()
        return trace_service_pb2.ExportTraceServiceResponse()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("port", type=int)
    p.add_argument("--slow", type=float, default=0)
    p.add_argument("--count-only", action="store_true")
    args = p.parse_args()
    receiver = Receiver(args.slow, args.count_only)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    print(json.dumps({"listening": args.port}), flush=True)
    while not server.wait_for_termination(timeout=1):
        if args.count_only:
            print(json.dumps({"spans": receiver.spans}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
