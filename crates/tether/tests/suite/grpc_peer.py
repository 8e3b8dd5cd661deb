"""A real gRPC server and client (grpcio) for the HTTP/2 proxy test.

    grpc_peer.py serve PORT
        A cleartext HTTP/2 gRPC server on 127.0.0.1:PORT (prior knowledge,
        as gRPC servers in a cluster usually are), service `test.Probe`:
        Echo (unary: the request reversed, its length in a trailer), Count
        (server streaming: N numbered messages), Fail (NOT_FOUND with a
        message), Meta (the metadata keys the call arrived with, as JSON).

    grpc_peer.py call TARGET AUTHORITY TOKEN
        Calls each method through TARGET with :authority AUTHORITY and a
        bearer TOKEN, and prints one JSON object with what came back.

Messages are raw bytes (no protobuf): gRPC's framing, HTTP/2 and trailers
are what is under test.
"""

import json
import sys
from concurrent import futures

import grpc

SERVICE = "test.Probe"


def serve(port):
    def echo(request, context):
        context.set_trailing_metadata((("x-echo-len", str(len(request))),))
        return request[::-1]

    def count(request, context):
        for i in range(int(request.decode())):
            yield b"%d" % i

    def fail(request, context):
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing: " + request.decode())

    def meta(request, context):
        return json.dumps(sorted({k for k, _ in context.invocation_metadata()})).encode()

    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
        "Count": grpc.unary_stream_rpc_method_handler(count),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
        "Meta": grpc.unary_unary_rpc_method_handler(meta),
    }
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=32),
        options=[
            ("grpc.max_receive_message_length", 8 << 20),
            ("grpc.max_send_message_length", 8 << 20),
        ],
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_insecure_port("127.0.0.1:%d" % port)
    server.start()
    print("grpc peer listening", flush=True)
    server.wait_for_termination()


def call(target, authority, token):
    channel = grpc.insecure_channel(
        target,
        options=[
            ("grpc.default_authority", authority),
            ("grpc.max_receive_message_length", 8 << 20),
            ("grpc.max_send_message_length", 8 << 20),
        ],
    )
    md = (("authorization", "Bearer " + token),)
    method = lambda name: "/%s/%s" % (SERVICE, name)
    out = {}

    big = bytes(i % 251 for i in range(1 << 20))
    echo = channel.unary_unary(method("Echo"))
    reply, c = echo.with_call(big, metadata=md, timeout=30)
    out["echo_ok"] = reply == big[::-1]
    out["echo_trailer"] = dict(c.trailing_metadata()).get("x-echo-len")

    out["count"] = [int(m) for m in channel.unary_stream(method("Count"))(b"200", metadata=md, timeout=30)]

    try:
        channel.unary_unary(method("Fail"))(b"x", metadata=md, timeout=30)
        out["fail"] = "succeeded"
    except grpc.RpcError as e:
        out["fail"] = [e.code().name, e.details()]

    out["meta"] = json.loads(channel.unary_unary(method("Meta"))(b"", metadata=md, timeout=30))

    calls = [echo.future(b"call %d" % i, metadata=md, timeout=30) for i in range(32)]
    out["concurrent_ok"] = sum(f.result() == (b"call %d" % i)[::-1] for i, f in enumerate(calls))

    try:
        echo(b"x", metadata=(("authorization", "Bearer wrong"),), timeout=30)
        out["bad_token"] = "succeeded"
    except grpc.RpcError as e:
        out["bad_token"] = e.code().name
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    else:
        call(sys.argv[2], sys.argv[3], sys.argv[4])
