"""`refusalkit serve RUN_DIR`: a page on localhost where one prompt gets the original's and the edited
model's answers side by side, streamed, with the run's headline numbers and a link to its report."""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from refusalkit.chat.options import ServeOptions, standalone
from refusalkit.options import options_from_args


def run_serve(args: argparse.Namespace) -> NoReturn:
    from refusalkit.chat.engine import load_chat_model
    from refusalkit.serve.server import make_server

    opts = options_from_args(args, ServeOptions)
    print(f"loading the model of {args.run_dir} ...", file=sys.stderr)
    model = load_chat_model(args.run_dir, opts.edit)
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
    server.server_close()
    # The process ends here, without the interpreter's finalization: a request thread (a daemon) may be
    # inside a generation, running torch code without the GIL, and finalizing under it can crash the
    # process (an abort, exit -6, was seen once in CI after Ctrl-C; its cause was not isolated). The model
    # lives in this process only, so nothing is left to restore or save.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    return standalone("refusalkit serve", ServeOptions, run_serve, argv)
