"""Proxyless gRPC client: reaches a meshed service with only the control plane's xDS.

usage: xds_client.py CONTROL_ADDR SERVICE PROTO_DIR CALLS
Prints one line per call: "<instance> <message>".
"""
import json
import os
import sys
import tempfile

control, service, proto_dir, calls = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

os.environ["GRPC_XDS_BOOTSTRAP_CONFIG"] = json.dumps({
    "xds_servers": [{
        "server_uri": control,
        "channel_creds": [{"type": "insecure"}],
        "server_features": ["xds_v3"],
    }],
    "node": {"id": "python-xds-client", "cluster": "tests", "locality": {}},
})

from grpc_tools import protoc  # noqa: E402

out = tempfile.mkdtemp()
rc = protoc.main(["protoc", f"-I{proto_dir}", f"--python_out={out}", f"--grpc_python_out={out}", "demo.proto"])
if rc != 0:
    sys.exit(f"protoc failed: {rc}")
sys.path.insert(0, out)

import grpc  # noqa: E402
import demo_pb2  # noqa: E402
import demo_pb2_grpc  # noqa: E402

with grpc.insecure_channel(f"xds:///{service}") as channel:
    stub = demo_pb2_grpc.DemoStub(channel)
    for i in range(calls):
        reply = stub.Hello(demo_pb2.HelloRequest(name=f"xds-{i}"), timeout=20, wait_for_ready=True)
        print(reply.instance, reply.message, flush=True)
