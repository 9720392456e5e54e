"""`refusalkit serve RUN_DIR`: a page on localhost where one prompt gets the original's and the edited
model's answers side by side, streamed, with the run's headline numbers and a link to its report."""

from __future__ import annotations

import argparse
import sys
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from refusalkit.chat.terminal import run_dir_argument
from refusalkit.options import add_flags, options_from_args


class ServeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    env_prefix: ClassVar[str] = "REFUSALKIT_SERVE_"  # REFUSALKIT_MAX_NEW_TOKENS is the run's setting

    host: str = Field(
        "127.0.0.1", description="Address to listen on (the default is reachable from this machine only)."
    )
    port: int = Field(8765, ge=0, le=65535, description="Port to listen on; 0 picks a free one.")
    browser: bool = Field(
        True, description="Open the page in the default browser (--no-browser: only print its address)."
    )
    max_new_tokens: int = Field(256, ge=1, description="Most new tokens per answer.")


def run_serve(args: argparse.Namespace) -> int:
    from refusalkit.chat.engine import load_chat_model
    from refusalkit.serve.server import make_server

    opts = options_from_args(args, ServeOptions)
    print(f"loading the model of {args.run_dir} ...", file=sys.stderr)
    model = load_chat_model(args.run_dir)
    server = make_server(model, args.run_dir, opts.host, opts.port, opts.max_new_tokens)
    port = server.server_address[1]
    url = f"http://{'127.0.0.1' if opts.host == '0.0.0.0' else opts.host}:{port}/"
    print(f"refusalkit serve: {url}  (Ctrl-C stops)", flush=True)
    if opts.browser:
        import webbrowser

        webbrowser.open(url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()
        model.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    from refusalkit.errors import RefusalkitError

    parser = argparse.ArgumentParser(prog="refusalkit serve")
    run_dir_argument(parser)
    add_flags(parser, ServeOptions)
    try:
        return run_serve(parser.parse_args(argv))
    except RefusalkitError as exc:
        print(f"refusalkit: error: {exc}", file=sys.stderr)
        return 2
