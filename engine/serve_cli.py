"""llava-serve: the command line of the OpenAI-compatible server (engine/server.py). It parses its arguments before
the server, torch and the model load, so that --help and a wrong flag answer at once; the server's limits live here
for the same reason."""

import argparse
import os
from pathlib import Path

from .media import MediaPolicy
from .url_fetch import parse_networks

MAX_BODY_BYTES = 30_000_000  # a 20 MB image, base64-encoded, and its conversation
# A stream's chunks at least this far apart (the tokens of the pause go together): on a busy CPU, a chunk per token
# per stream costs the scheduler's thread its time; 50 updates a second still read as smooth streaming.
STREAM_INTERVAL = 0.02


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(prog="llava-serve", description="An OpenAI-compatible chat-completions server on "
                                     "the engine: /v1/chat/completions, /v1/models, /health, /metrics.")
    parser.add_argument("--model", required=True, help="a llava_plugin, llava-hf or original LLaVA checkpoint (folder or hub id)")
    parser.add_argument("--served-model-name", help="the model id clients ask for (default: the checkpoint folder's name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", help="cuda or cpu (default: cuda when there is one)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="compute dtype (auto: the checkpoint's; on a CPU float32 for a float16 or bfloat16 checkpoint whose "
                             "float32 weights take at most half the available memory, as half precision is slow on CPUs)")
    parser.add_argument("--allowed-local-media-path", type=Path,
                        help="allow file:// image URLs inside this folder (nothing outside it, links resolved)")
    parser.add_argument("--allow-image-urls", action="store_true",
                        help="fetch http(s) image URLs (size and time limited; public addresses only)")
    parser.add_argument("--allow-private-image-urls", nargs="*", metavar="NETWORK",
                        help="with --allow-image-urls, also fetch from these networks (10.0.0.0/8, 192.168.1.7, fd00::/8) "
                        "although they are not public; no network named: from every address, loopback and cloud "
                        "metadata (169.254.169.254) included")
    parser.add_argument("--max-images-per-request", type=int, default=MediaPolicy.max_images,
                        help="images in one request's conversation at most; more are answered 400 (1: LLaVA-1.5's rule)")
    parser.add_argument("--max-image-bytes", type=int, default=MediaPolicy.max_bytes)
    parser.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES)
    parser.add_argument("--max-concurrent", type=int, default=64, help="requests at once; more are answered 503")
    parser.add_argument("--stream-interval", type=float, default=STREAM_INTERVAL,
                        help="seconds between a stream's chunks at least (0: a chunk per token as soon as it comes)")
    parser.add_argument("--single-process", action="store_true",
                        help="run the model in the server's own process (default: a process of its own, see engine_process)")
    parser.add_argument("--threads", type=int,
                        help="threads for the model on the CPU (default: $OMP_NUM_THREADS, else one fewer than the cores)")
    parser.add_argument("--api-key", default=os.environ.get("LLAVA_SERVE_API_KEY"),
                        help="require this bearer key (default: $LLAVA_SERVE_API_KEY, better: a command line is seen by "
                        "every user of the machine in ps; none: open)")
    args = parser.parse_args(argv)
    if args.allowed_local_media_path and not args.allowed_local_media_path.is_dir():
        parser.error(f"--allowed-local-media-path {args.allowed_local_media_path} is not a folder")
    if args.allow_private_image_urls is not None and not args.allow_image_urls:
        parser.error("--allow-private-image-urls needs --allow-image-urls")
    if args.max_images_per_request < 1:
        parser.error("--max-images-per-request must be at least 1")
    if args.api_key is not None and not args.api_key.strip():
        parser.error("the API key (--api-key or LLAVA_SERVE_API_KEY) is empty, which would let in any request that "
                     "sends 'Bearer' with nothing after it: give a key, or unset it to serve without one")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    try:
        private = parse_networks(args.allow_private_image_urls) if args.allow_private_image_urls is not None else ()
    except ValueError as error:
        parser.error(f"--allow-private-image-urls: {error}")
    import uvicorn

    from .engine_process import EngineProcess, EngineStopped
    from .server import create_app

    if args.single_process:
        import torch

        from .chat import ChatEngine

        if args.threads:
            torch.set_num_threads(args.threads)
        engine = ChatEngine(args.model, device=args.device, dtype=args.dtype)
    else:
        try:
            engine = EngineProcess(args.model, threads=args.threads, device=args.device, dtype=args.dtype)
        except EngineStopped as error:  # one line says what failed (the child printed a traceback if it was a bug)
            parser.exit(1, f"llava-serve: {error}\n")
    name = args.served_model_name or Path(args.model.rstrip("/")).name
    policy = MediaPolicy(args.allowed_local_media_path, args.allow_image_urls, args.max_image_bytes,
                         private_networks=private, max_images=args.max_images_per_request)
    app = create_app(engine, name, policy, args.api_key, args.max_body_bytes, args.max_concurrent, args.stream_interval)
    print(f"llava-serve: {name} on http://{args.host}:{args.port}/v1", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    finally:
        if isinstance(engine, EngineProcess):
            engine.close()


if __name__ == "__main__":
    main()
