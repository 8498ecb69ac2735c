"""A minimal multilora client: streams one generation and prints it.

    python examples/python/client.py --addr 127.0.0.1:50051 --prompt "The capital of France is"
    python examples/python/client.py --adapter tenant-7 --load /path/to/peft-folder

With --load, the adapter is first loaded (or replaced) at runtime through the
Adapters service.

The gRPC stubs are generated from proto/ at start (grpcio-tools), so nothing generated
is committed.
"""
import argparse
import pathlib
import sys
import tempfile

import grpc
from grpc_tools import protoc

PROTO_ROOT = pathlib.Path(__file__).resolve().parents[2] / "proto"


def load_stubs():
    out = tempfile.mkdtemp(prefix="multilora-stubs-")
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    rc = protoc.main([
        "protoc", f"-I{PROTO_ROOT}", f"-I{include}",
        f"--python_out={out}", f"--grpc_python_out={out}",
        *(str(p) for p in sorted((PROTO_ROOT / "multilora/v1").glob("*.proto"))),
    ])
    if rc != 0:
        raise RuntimeError(f"protoc failed with {rc}")
    sys.path.insert(0, out)
    from multilora.v1 import adapters_pb2, adapters_pb2_grpc, generation_pb2, generation_pb2_grpc
    return generation_pb2, generation_pb2_grpc, adapters_pb2, adapters_pb2_grpc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--addr", default="127.0.0.1:50051")
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--adapter", default="", help="adapter name (empty: the base model)")
    ap.add_argument("--load", default="", help="load --adapter from this PEFT folder first")
    args = ap.parse_args()

    pb, rpc, apb, arpc = load_stubs()
    with grpc.insecure_channel(args.addr) as channel:
        if args.load:
            info = arpc.AdaptersStub(channel).LoadAdapter(
                apb.LoadAdapterRequest(name=args.adapter, source=args.load), timeout=120
            )
            print(f"loaded {info.name} version={info.version} rank={info.rank} bytes={info.bytes}")
        stub = rpc.GenerationStub(channel)
        request = pb.GenerateRequest(
            request_id="python-example",
            adapter=args.adapter,
            prompt=args.prompt,
            max_new_tokens=args.max_new_tokens,
            sampling=pb.SamplingParams(temperature=0.0),
        )
        text = []
        for msg in stub.Generate(request, timeout=120):
            if msg.HasField("delta"):
                text.append(msg.delta.text)
                print(msg.delta.text, end="", flush=True)
            else:
                final = msg.final
                print()
                print(
                    f"finish={pb.FinishReason.Name(final.finish_reason)} "
                    f"prompt_tokens={final.usage.prompt_tokens} "
                    f"completion_tokens={final.usage.completion_tokens} "
                    f"ttft={final.usage.time_to_first_token_s:.3f}s "
                    f"adapter_version={final.adapter_version}"
                )
        if not text:
            raise SystemExit("no tokens received")


if __name__ == "__main__":
    main()
